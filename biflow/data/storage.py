"""One place that turns a storage URI into a pyarrow filesystem and a path.

Accepted forms::

    runs/data/fmnist            a local path (relative or absolute)
    file:///data/fmnist         the same, as a URI
    s3://bucket/prefix          S3 or any S3-compatible store (MinIO, SeaweedFS, moto)
    gs://bucket/prefix          Google Cloud Storage (or an emulator such as fake-gcs-server)

The endpoint (``http://127.0.0.1:9000``, ``https://minio.example``, a GCS
emulator's ``http://127.0.0.1:4443``) and the S3 region come from arguments,
never from the URI. Credentials come only from the standard chains (AWS:
environment, shared profile, instance role; Google: Application Default
Credentials, the VM's service account); they are never put in URIs,
manifests, logs or error messages. A plain-http GCS endpoint is an emulator
and gets no credentials at all.

Retries: every filesystem returned here keeps retrying a failed request for
``BIFLOW_STORAGE_RETRY_MINUTES`` (default 5) with backoff, so a storage
outage of a few minutes stalls a run instead of ending it. Only the bucket
check of :func:`resolve` (``check=True``, the driver's pre-flight) uses a
budget of a few seconds, so a wrong endpoint still fails fast.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from biflow.errors import UserError

SUPPORTED_SCHEMES = ("local path", "file://", "s3://", "gs://")
RETRY_MINUTES_ENV = "BIFLOW_STORAGE_RETRY_MINUTES"
DEFAULT_RETRY_MINUTES = 5.0
# AWS's default retry strategy waits 50 ms before the first retry and doubles every time (no cap)
S3_FIRST_DELAY_S = 0.05
CHECK_S3_ATTEMPTS = 7  # the bucket check: 6 retries, 3.2 s against a refused port
CHECK_GCS_SECONDS = 2.0  # the bucket check: about 4 s against a refused port

# what each object store's messages say; {bucket} is filled in
SERVICES = {
    "s3": {"name": "S3", "make_bucket": "aws s3 mb s3://{bucket}",
           "credentials": "use the AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a profile",
           "check_credentials": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role"},
    "gs": {"name": "GCS", "make_bucket": "gcloud storage buckets create gs://{bucket}",
           "credentials": "use Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
                          "`gcloud auth application-default login`) or the VM's service account",
           "check_credentials": "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login` "
                                "or the VM's service account"},
}
# refused credentials, in S3's and GCS's words (403 as a whole word: a port such as 40321 is not one)
DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|\b403\b|EXPIRED_TOKEN|"
                    r"ExpiredToken|PERMISSION_DENIED|UNAUTHENTICATED")


def retry_seconds() -> float:
    """How long a request to object storage is retried: ``BIFLOW_STORAGE_RETRY_MINUTES`` (default 5)."""
    raw = os.environ.get(RETRY_MINUTES_ENV, "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_RETRY_MINUTES
    except ValueError:
        raise UserError(f"{RETRY_MINUTES_ENV}={raw!r}: expected a number of minutes, e.g. 5") from None
    if not (minutes > 0 and math.isfinite(minutes)):
        raise UserError(f"{RETRY_MINUTES_ENV} must be > 0 minutes, got {raw!r}")
    return minutes * 60


def s3_attempts(seconds: float) -> int:
    """Attempts for AWS's default retry strategy to keep retrying for at least ``seconds``:
    ``n`` retries wait 0.05, 0.1, 0.2, ... s, in all ``0.05 * (2**n - 1)`` s."""
    return 1 + max(1, math.ceil(math.log2(seconds / S3_FIRST_DELAY_S + 1)))


def s3_retry_span(attempts: int) -> float:
    """Seconds a request keeps retrying with ``attempts`` (the inverse of :func:`s3_attempts`)."""
    return S3_FIRST_DELAY_S * (2 ** (attempts - 1) - 1)


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """``http://host:port`` -> ("host:port", "http"); bare ``host:port`` -> https."""
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise UserError(f"endpoint {parts.scheme}://{parts.hostname}: scheme must be http or https")
        if parts.username or parts.password:
            raise UserError("endpoint must not contain credentials; use the environment or a profile")
        return parts.netloc, parts.scheme
    return endpoint, "https"


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with AWS's default retry strategy, kept when pickled.

    pyarrow's own ``__reduce__`` drops ``retry_strategy``: Ray's controller, its
    workers and Ray Data's read tasks all get the filesystem pickled, and used to
    retry a refused connection for about 1.5 s whatever the driver built.
    ``options`` never hold credentials (the AWS chain supplies them in each process).
    """

    def __init__(self, attempts: int, options: dict[str, Any]):
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts), **options)
        self.attempts, self.options = attempts, options

    def __reduce__(self):
        return RetryingS3FileSystem, (self.attempts, self.options)


def _s3_filesystem(endpoint: str = "", region: str = "", attempts: int = 0) -> RetryingS3FileSystem:
    options: dict[str, Any] = {}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        host, scheme = _split_endpoint(endpoint)
        options.update(endpoint_override=host, scheme=scheme)
        # S3-compatible stores rarely support virtual-host addressing.
        options["force_virtual_addressing"] = False
    region = region or os.environ.get("AWS_REGION", "") or os.environ.get("AWS_DEFAULT_REGION", "")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"  # custom stores ignore it; avoids a region lookup
    return RetryingS3FileSystem(attempts or s3_attempts(retry_seconds()), options)


def _gcs_filesystem(endpoint: str = "", seconds: float = 0) -> pafs.GcsFileSystem:
    """GCS; its client retries with jittered backoff doubling from about 1 s until ``seconds``
    (a ``GcsFileSystem`` keeps ``retry_time_limit`` when pickled)."""
    options: dict[str, Any] = {"retry_time_limit": timedelta(seconds=seconds or retry_seconds())}
    endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST", "")
    if endpoint:
        host, scheme = _split_endpoint(endpoint)
        options.update(endpoint_override=host, scheme=scheme)
        # plain http is an emulator: no Google credentials go over an unencrypted connection
        options["anonymous"] = scheme == "http"
    return pafs.GcsFileSystem(**options)


def _check_bucket(fs: pafs.FileSystem, bucket: str, endpoint: str, service: str = "s3") -> None:
    about = SERVICES[service]
    name, where = about["name"], f" at {endpoint}" if endpoint else ""
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        text = clean_error(exc)
        if DENIED.search(text):
            raise UserError(f"access denied to {name} bucket {bucket!r}{where}: check the credentials "
                            f"({about['check_credentials']}) and the bucket policy ({text})") from None
        raise UserError(f"cannot reach {name} bucket {bucket!r}{where}: {text}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{name} bucket {bucket!r} does not exist{where} (create it first, e.g. "
                        f"`{about['make_bucket'].format(bucket=bucket)}`)")


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

    ``path`` is what to pass to the filesystem (``bucket/prefix`` for S3 and
    GCS, an absolute path locally), with no trailing slash. With ``check`` the
    bucket must exist, asked with a budget of seconds: an unreachable endpoint, a
    missing bucket or refused credentials is a ``UserError`` naming the bucket.
    The filesystem returned retries for minutes (:func:`retry_seconds`); code
    that runs while training (workers, uploads) passes ``check=False``.
    """
    uri = str(uri).strip()
    if not uri:
        raise UserError("empty storage URI; give a local path, file:///path, s3://bucket/prefix or gs://bucket/prefix")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        path = parts.path if scheme == "file" else uri
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise UserError(f"file URI {uri!r}: use file:///absolute/path (no host)")
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a", "gs", "gcs"):
        service = "gs" if scheme in ("gs", "gcs") else "s3"
        bucket = _bucket(parts, uri, service)
        if service == "s3":
            fs: pafs.FileSystem = _s3_filesystem(endpoint, region)
            quick = _s3_filesystem(endpoint, region, attempts=CHECK_S3_ATTEMPTS) if check else None
        else:
            fs = _gcs_filesystem(endpoint)
            quick = _gcs_filesystem(endpoint, seconds=CHECK_GCS_SECONDS) if check else None
        if quick is not None:
            _check_bucket(quick, bucket, endpoint, service)
        prefix = parts.path.strip("/")
        return fs, f"{bucket}/{prefix}" if prefix else bucket
    raise UserError(f"unsupported storage URI scheme {parts.scheme + '://'!r} in {_redact(uri)!r}; "
                    f"supported: {', '.join(SUPPORTED_SCHEMES)}")


def _bucket(parts, uri: str, service: str) -> str:
    """The bucket of an object-store URI, refusing credentials and query strings in it."""
    about = SERVICES[service]
    name = about["name"]
    if "@" in parts.netloc or parts.password:
        raise UserError(f"{name} URIs must not contain credentials; {about['credentials']}")
    if parts.query:
        what = "the endpoint and region as options" if service == "s3" else "the endpoint as an option"
        raise UserError(f"{name} URI {service}://{parts.netloc}{parts.path}: give {what} (--endpoint / "
                        "data.endpoint), not as a query string")
    if not parts.netloc:
        raise UserError(f"{name} URI {uri!r} has no bucket; expected {service}://bucket/prefix")
    return parts.netloc


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
    S3 and GCS, ``storage_filesystem`` (the controller and every worker get it pickled,
    retry budget included). Use as ``RunConfig(name=..., **ray_storage(uri, endpoint))``."""
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
