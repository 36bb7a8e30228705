"""storage.resolve: local paths, file://, s3:// against a real moto server, gs:// against a real
fake-gcs-server; errors for people; retry budgets that survive the trip to Ray processes."""

from __future__ import annotations

import time

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from biflow.cli import app
from biflow.data import storage
from biflow.errors import UserError
from tests.conftest import refused_port


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
    with pytest.raises(UserError, match=r"unsupported storage URI scheme 'hdfs://'.*s3://, gs://"):
        storage.resolve("hdfs://namenode/x")
    with pytest.raises(UserError, match="GCS URIs must not contain credentials") as err:
        storage.resolve("gs://svc-account:topsecret@bucket/x")
    assert "topsecret" not in str(err.value)
    with pytest.raises(UserError, match=r"gs://bucket/x: give the endpoint as an option .* not as a query string"):
        storage.resolve("gs://bucket/x?endpoint_override=127.0.0.1:9")
    with pytest.raises(UserError, match=r"no bucket; expected gs://bucket/prefix"):
        storage.resolve("gs:///x")
    with pytest.raises(UserError, match="http or https"):
        storage.resolve("gs://bucket/x", endpoint="ftp://127.0.0.1:1")
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


def test_gcs_roundtrip_ray_storage_and_missing_bucket(gcs_server):
    bucket = gcs_server.make_bucket("storage-ok")
    fs, path = storage.resolve(f"gs://{bucket}/deep/prefix/", endpoint=gcs_server.endpoint)
    assert isinstance(fs, pafs.GcsFileSystem) and path == f"{bucket}/deep/prefix"
    storage.write_bytes(fs, storage.join(path, "f.txt"), b"hello")
    assert gcs_server.objects(bucket) == {"deep/prefix/f.txt": 5}
    assert storage.read_bytes(fs, storage.join(path, "f.txt")) == b"hello"
    assert storage.list_files(fs, path) == [f"{bucket}/deep/prefix/f.txt"]
    kwargs = storage.ray_storage(f"gs://{bucket}/runs", endpoint=gcs_server.endpoint)
    assert kwargs["storage_path"] == f"{bucket}/runs" and isinstance(kwargs["storage_filesystem"], pafs.GcsFileSystem)
    with pytest.raises(UserError, match=r"GCS bucket 'no-such-bucket-4242' does not exist at http://127\.0\.0\.1:"):
        storage.resolve("gs://no-such-bucket-4242/p", endpoint=gcs_server.endpoint)
    res = CliRunner().invoke(app, ["prepare-data", "/nonexistent", "gs://missing-bucket-77/x", "--format", "folder",
                                   "--endpoint", gcs_server.endpoint])
    out = res.output.strip()
    assert res.exit_code == 2 and out.startswith("error:") and len(out.splitlines()) == 1, out
    assert "GCS bucket 'missing-bucket-77' does not exist" in out


def test_retry_budget_from_env_and_its_s3_schedule(monkeypatch):
    assert storage.retry_seconds() == 60 * storage.DEFAULT_RETRY_MINUTES == 300
    # AWS's default strategy doubles from 50 ms: 13 retries span 409.55 s, the least covering 5 minutes
    assert storage.s3_attempts(300) == 14 and storage.s3_retry_span(14) == pytest.approx(409.55)
    assert storage.s3_retry_span(storage.s3_attempts(3)) == pytest.approx(3.15)
    monkeypatch.setenv(storage.RETRY_MINUTES_ENV, "0.5")
    assert storage.retry_seconds() == 30
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(storage.RETRY_MINUTES_ENV, bad)
        with pytest.raises(UserError, match=storage.RETRY_MINUTES_ENV):
            storage.retry_seconds()


def test_retry_budget_survives_pickling_into_ray_tasks_and_the_check_stays_fast(ray_local, monkeypatch):
    """A filesystem from resolve() keeps retrying a refused connection for its budget inside a
    Ray task (Ray's controller, workers and Ray Data tasks get it pickled: pyarrow's own
    S3FileSystem pickling drops the retry strategy, leaving about 1.5 s), while the bucket
    check of resolve(check=True) gives up in seconds."""
    monkeypatch.setenv(storage.RETRY_MINUTES_ENV, "0.05")  # 3 s: S3 7 attempts, 3.15 s
    endpoint = f"http://127.0.0.1:{refused_port()}"
    s3, _ = storage.resolve("s3://bucket/x", endpoint=endpoint, check=False)
    gcs, _ = storage.resolve("gs://bucket/x", endpoint=endpoint, check=False)

    @ray_local.remote(num_cpus=0)
    def refused_for(fs) -> tuple[float, str]:
        t0 = time.perf_counter()
        try:
            fs.get_file_info("bucket/x")
        except OSError as exc:
            return time.perf_counter() - t0, str(exc)
        return time.perf_counter() - t0, "no error"

    pending = [refused_for.remote(s3), refused_for.remote(gcs)]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach GCS bucket 'bucket'"):
        storage.resolve("gs://bucket/x", endpoint=endpoint)
    gcs_check = time.perf_counter() - t0
    (s3_s, s3_err), (gcs_s, gcs_err) = ray_local.get(pending)
    print(f"in a Ray task: S3 {s3_s:.2f}s, GCS {gcs_s:.2f}s; GCS bucket check {gcs_check:.2f}s")
    assert "NETWORK_CONNECTION" in s3_err and 3.1 <= s3_s < 8, (s3_s, s3_err)
    assert "UNAVAILABLE" in gcs_err and 3.0 <= gcs_s < 12, (gcs_s, gcs_err)
    assert gcs_check < 8
