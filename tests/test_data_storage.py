"""storage.resolve: local paths, file://, s3:// against a real moto server; errors for people."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from biflow.cli import app
from biflow.data import storage
from biflow.errors import UserError


pytestmark = pytest.mark.integration


def test_local_path_and_file_uri(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = storage.resolve(f"file://{tmp_path}/b/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "b")
    storage.write_bytes(fs, storage.join(path, "x/y.bin"), b"12345")
    assert storage.read_bytes(fs, storage.join(path, "x/y.bin")) == b"12345"
    assert storage.list_files(fs, path) == [str(tmp_path / "b/x/y.bin")]  # no temp file left behind
    assert storage.ray_storage(str(tmp_path / "runs")) == {"storage_path": str(tmp_path / "runs")}


def test_bad_schemes_and_credentials_in_uri():
    with pytest.raises(UserError, match=r"unsupported storage URI scheme 'gs://'.*s3://"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(UserError, match="must not contain credentials") as err:
        storage.resolve("s3://AKIAXXXX:topsecret@bucket/x")
    assert "topsecret" not in str(err.value)
    with pytest.raises(UserError, match="not as a query string"):
        storage.resolve("s3://bucket/x?endpoint_override=127.0.0.1:9")
    with pytest.raises(UserError, match="no bucket"):
        storage.resolve("s3:///x")
    with pytest.raises(UserError, match="http or https"):
        storage.resolve("s3://bucket/x", endpoint="ftp://127.0.0.1:1")


def test_s3_roundtrip_and_ray_storage(s3_server):
    bucket = s3_server.make_bucket("storage-ok")
    fs, path = storage.resolve(f"s3://{bucket}/deep/prefix/", endpoint=s3_server.endpoint)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/deep/prefix"
    storage.write_bytes(fs, storage.join(path, "f.txt"), b"hello")
    body = s3_server.client().get_object(Bucket=bucket, Key="deep/prefix/f.txt")["Body"].read()
    assert body == b"hello"
    assert storage.list_files(fs, path) == [f"{bucket}/deep/prefix/f.txt"]
    kwargs = storage.ray_storage(f"s3://{bucket}/runs", endpoint=s3_server.endpoint)
    assert kwargs["storage_path"] == f"{bucket}/runs"
    assert isinstance(kwargs["storage_filesystem"], pafs.S3FileSystem)


def test_missing_bucket_names_bucket_not_secret(s3_server):
    with pytest.raises(UserError) as err:
        storage.resolve("s3://no-such-bucket-4242/p", endpoint=s3_server.endpoint)
    msg = str(err.value)
    assert "no-such-bucket-4242" in msg and "does not exist" in msg
    assert s3_server.secret_key not in msg and s3_server.access_key not in msg


def test_cli_errors_are_one_clean_line(s3_server, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["prepare-data", str(tmp_path), "s3://missing-bucket-77/x", "--format", "folder",
                              "--endpoint", s3_server.endpoint])
    assert res.exit_code == 2
    out = res.output.strip()
    assert out.startswith("error:") and "missing-bucket-77" in out and len(out.splitlines()) == 1
    assert s3_server.secret_key not in out
    res = runner.invoke(app, ["prepare-data", str(tmp_path), "hdfs://nn/x", "--format", "folder"])
    assert res.exit_code == 2 and "unsupported storage URI scheme 'hdfs://'" in res.output
