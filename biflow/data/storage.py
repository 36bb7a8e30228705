"""One place that turns a storage URI into a pyarrow filesystem and a path.

Accepted forms::

    runs/data/fmnist            a local path (relative or absolute)
    file:///data/fmnist         the same, as a URI
    s3://bucket/prefix          S3 or any S3-compatible store (MinIO, SeaweedFS, moto)

For S3 the endpoint (``http://127.0.0.1:9000`` or ``https://minio.example``),
the region and the retry policy come from arguments, never from the URI.
Credentials come only from the standard AWS chain (environment, shared
profile, instance role); they are never put in URIs, manifests, logs or
error messages.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from biflow.errors import UserError

S3_RETRY_ATTEMPTS = 5
SUPPORTED_SCHEMES = ("local path", "file://", "s3://")


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """``http://host:port`` -> ("host:port", "http"); bare ``host:port`` -> https."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise UserError(f"endpoint {parts.scheme}://{parts.hostname}: scheme must be http or https")
        if parts.username or parts.password:
            raise UserError("endpoint must not contain credentials; use the AWS environment or profile")
        return parts.netloc, parts.scheme
    return endpoint, "https"


def _s3_filesystem(endpoint: str = "", region: str = "") -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        host, scheme = _split_endpoint(endpoint)
        kwargs.update(endpoint_override=host, scheme=scheme)
        # S3-compatible stores rarely support virtual-host addressing.
        kwargs["force_virtual_addressing"] = False
    region = region or os.environ.get("AWS_REGION", "") or os.environ.get("AWS_DEFAULT_REGION", "")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # custom stores ignore it; avoids a region lookup
    return pafs.S3FileSystem(**kwargs)


def _check_bucket(fs: pafs.FileSystem, bucket: str, endpoint: str) -> None:
    where = f" at {endpoint}" if endpoint else ""
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        text = clean_error(exc)
        if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                   "403", "EXPIRED_TOKEN", "ExpiredToken")):
            raise UserError(f"access denied to S3 bucket {bucket!r}{where}: check the credentials (AWS_ACCESS_KEY_ID/"
                            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and the bucket policy "
                            f"({text})") from None
        raise UserError(f"cannot reach S3 bucket {bucket!r}{where}: {text}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"S3 bucket {bucket!r} does not exist{where} (create it first, e.g. "
                        f"`aws s3 mb s3://{bucket}`)")


def clean_error(exc: BaseException) -> str:
    """An error message with anything credential-like removed."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return text


def resolve(uri: str, endpoint: str = "", region: str = "", check: bool = True) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a storage URI.

    ``path`` is what to pass to the filesystem (``bucket/prefix`` for S3, an
    absolute path locally), with no trailing slash. With ``check`` an S3
    bucket must exist; a missing one is a ``UserError`` naming the bucket.
    """
    uri = str(uri).strip()
    if not uri:
        raise UserError("empty storage URI; give a local path, file:///path or s3://bucket/prefix")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        path = parts.path if scheme == "file" else uri
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise UserError(f"file URI {uri!r}: use file:///absolute/path (no host)")
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a"):
        if "@" in parts.netloc or parts.password:
            raise UserError("S3 URIs must not contain credentials; use the AWS environment "
                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a profile")
        if parts.query:
            raise UserError(f"S3 URI s3://{parts.netloc}{parts.path}: give the endpoint and region as "
                            "options (--endpoint / data.endpoint), not as a query string")
        bucket = parts.netloc
        if not bucket:
            raise UserError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/prefix")
        fs = _s3_filesystem(endpoint, region)
        if check:
            _check_bucket(fs, bucket, endpoint)
        prefix = parts.path.strip("/")
        return fs, f"{bucket}/{prefix}" if prefix else bucket
    raise UserError(f"unsupported storage URI scheme {parts.scheme + '://'!r} in {_redact(uri)!r}; "
                    f"supported: {', '.join(SUPPORTED_SCHEMES)}")


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    netloc = (parts.hostname or "") if "@" in parts.netloc else parts.netloc
    return f"{parts.scheme}://{netloc}{parts.path}"


def absolute(uri: str) -> str:
    """A local path made absolute against this process's working directory; URIs unchanged.
    Ray workers run in their own working directory, so a relative path handed to them
    would name another place."""
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def ray_storage(uri: str, endpoint: str = "", region: str = "") -> dict[str, Any]:
    """Keyword arguments for ``ray.train.RunConfig``: ``storage_path`` and, for
    S3, ``storage_filesystem``. Use as ``RunConfig(name=..., **ray_storage(uri, endpoint))``."""
    fs, path = resolve(uri, endpoint, region)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        return {"storage_path": path}
    return {"storage_path": path, "storage_filesystem": fs}


def join(path: str, *parts: str) -> str:
    """Join path components the way pyarrow filesystems expect ('/' separated)."""
    return posixpath.join(path, *parts)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object. On S3 an object appears only when complete; locally we
    write a temporary file and rename, so a reader never sees a partial file."""
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Every file below ``path`` (recursive); empty when ``path`` does not exist."""
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
