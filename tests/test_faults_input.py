"""Faults from bad input and security defaults, through the real CLI in-process.

Every bad config or CLI call must exit non-zero with a message naming the
problem before any Ray worker starts: ``init_ray`` is replaced by a function
that fails the test if it is ever reached. Storage problems are real: a
refused port, a missing bucket and a moto server that checks credentials.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import ray.job_submission  # noqa: F401  imported here, not first inside CliRunner's swapped stdio
from typer.testing import CliRunner

from biflow.cli import app
from tests.conftest import refused_port, start_moto

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
FWD = str(REPO / "jobs" / "smoke-forward.yaml")
REV = str(REPO / "jobs" / "smoke-reverse.yaml")


@pytest.fixture(scope="module")
def s3_auth():
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are refused."""
    old = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        proc, port = start_moto()
    finally:
        if old is None:
            os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = old
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def no_workers(monkeypatch):
    """Fail loudly if a command gets as far as starting Ray."""
    import biflow.train.launch as launch

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started: the error was not caught before the workers")

    monkeypatch.setattr(launch, "init_ray", forbidden)
    monkeypatch.setattr(launch, "build_trainer", forbidden)


@pytest.fixture()
def bad_run(tmp_path):
    """A run dir whose only checkpoint was written by 4 workers, and a partial (uncommitted) one."""
    from biflow.train import checkpoint as ckpt_io

    run = tmp_path / "runs" / "four"
    d = run / "checkpoint_00000004"
    d.mkdir(parents=True)
    meta = {"stage": "forward", "world_size": 4, "step": 4, "commit_marker": True, "config": {}}
    ckpt_io.write_rank0_files(d, {}, meta)
    ckpt_io.commit(ckpt_io.pafs.LocalFileSystem(), str(d))
    partial = tmp_path / "runs" / "partial" / "checkpoint_00000006"
    partial.mkdir(parents=True)
    ckpt_io.write_rank0_files(partial, {}, {**meta, "world_size": 2})  # EMA written, never committed
    return tmp_path / "runs"


def _cases(tmp: Path, runs: Path, s3_auth: str, s3_open: str, gcs_open: str) -> list[tuple[str, list[str], list[str]]]:
    refused = f"http://127.0.0.1:{refused_port()}"
    data = str(tmp / "nodata")
    return [
        ("unknown key", ["train", "forward", "-c", FWD, "--set", "train.stepz=3"],
         ["unknown key 'train.stepz'", "did you mean 'train.steps'?"]),
        # numbers as people write them get past parsing: the next problem, the name, is what stops the run
        ("scientific notation parses", ["train", FWD, "--set", "optim.lr=1e-4", "--set", "train.steps=1e3",
                                        "--set", "optim.weight_decay=.5", "--name", "a/b"],
         ["name='a/b': a run name must be non-empty"]),
        ("wrong type", ["train", "forward", "-c", FWD, "--set", "train.steps=lots"],
         ["train.steps", "expected an integer"]),
        ("negative batch", ["train", "forward", "-c", FWD, "--set", "train.batch_size=-4"], ["train.batch_size"]),
        ("negative lr", ["train", "forward", "-c", FWD, "--set", "optim.lr=-1"], ["optim.lr"]),
        ("zero workers", ["train", "forward", "-c", FWD, "--set", "ray.workers=0"], ["ray.workers must be >= 1"]),
        ("patch does not divide image", ["train", "forward", "-c", FWD, "--set", "flow.patch_size=5"],
         ["flow.patch_size", "28"]),
        ("heads do not divide width", ["train", "forward", "-c", FWD, "--set", "flow.num_heads=3"],
         ["flow.num_heads=3 does not divide flow.width=32"]),
        ("bad enum", ["train", "forward", "-c", FWD, "--set", "train.engine=horovod"],
         ["train.engine", "allowed values"]),
        ("bad zero stage", ["train", "forward", "-c", FWD, "--set", "train.zero_stage=4"],
         ["train.zero_stage=4"]),
        ("bad stage", ["train", "sideways", "-c", FWD], ["stage 'sideways'", "forward, reverse"]),
        ("stage disagrees with the file", ["train", "forward", "-c", REV],
         ["`biflow train forward` but", "says stage: reverse", f"run `biflow train {REV}`"]),
        ("missing config file", ["train", "forward", "-c", str(tmp / "nope.yaml")], ["config file not found"]),
        ("malformed --set", ["train", "forward", "-c", FWD, "--set", "train.steps"], ["expected KEY=VALUE"]),
        ("name with slash", ["train", "forward", "-c", FWD, "--name", "a/b", "--storage", str(runs)],
         ["a run name must be non-empty and contain no '/'"]),
        ("keep_checkpoints 0", ["train", "forward", "-c", FWD, "--set", "train.keep_checkpoints=0",
                                "--storage", str(runs)], ["train.keep_checkpoints"]),
        ("missing forward checkpoint", ["train", "reverse", "-c", REV, "--set", "train.forward_checkpoint=nope",
                                        "--storage", str(runs)], ["train.forward_checkpoint='nope'", "no checkpoint"]),
        ("only a partial checkpoint", ["train", "reverse", "-c", REV, "--set", "train.forward_checkpoint=partial",
                                       "--storage", str(runs)], ["train.forward_checkpoint='partial'", "no checkpoint"]),
        ("world size differs from checkpoint", ["train", "forward", "-c", FWD, "--name", "four",
                                                "--storage", str(runs), "--workers", "2"],
         ["ray.workers=2", "checkpointed with 4 workers"]),
        ("missing data manifest", ["train", "forward", "-c", FWD, "--storage", str(runs), "--set", f"data.uri={data}"],
         ["no manifest.json under", data]),
        ("bad URI scheme", ["train", "forward", "-c", FWD, "--storage", "hdfs://namenode/runs"],
         ["unsupported storage URI scheme 'hdfs://'", "s3://, gs://"]),
        ("credentials in URI", ["train", "forward", "-c", FWD, "--storage", "s3://AKIAFAKE:hunter2@bucket/runs"],
         ["must not contain credentials"]),
        ("query string in URI", ["train", "forward", "-c", FWD,
                                 "--storage", "s3://bucket/runs?endpoint_override=x"], ["not as a query string"]),
        ("unreachable storage", ["train", "forward", "-c", FWD, "--storage", "s3://bucket/runs",
                                 "--set", f"ray.storage_endpoint={refused}"],
         ["cannot reach S3 bucket 'bucket'", refused]),
        ("missing bucket", ["train", "forward", "-c", FWD, "--storage", "s3://no-such-bucket/runs",
                            "--set", f"ray.storage_endpoint={s3_open}"], ["S3 bucket 'no-such-bucket' does not exist"]),
        ("wrong credentials", ["train", "forward", "-c", FWD, "--storage", "s3://bucket/runs",
                               "--set", f"ray.storage_endpoint={s3_auth}"],
         ["access denied to S3 bucket 'bucket'", "credentials"]),
        ("missing GCS bucket", ["train", "forward", "-c", FWD, "--storage", "gs://no-such-bucket/runs",
                                "--set", f"ray.storage_endpoint={gcs_open}"],
         ["GCS bucket 'no-such-bucket' does not exist", "gcloud storage buckets create"]),
        ("credentials in GCS URI", ["train", "forward", "-c", FWD, "--storage", "gs://svc:hunter2@bucket/runs"],
         ["GCS URIs must not contain credentials"]),
        ("bad endpoint scheme", ["train", "forward", "-c", FWD, "--storage", "s3://bucket/runs",
                                 "--set", "ray.storage_endpoint=ftp://127.0.0.1:21"], ["scheme must be http or https"]),
        ("YAML as the argument, stage from the file", ["train", FWD, "--set", "train.stepz=3"],
         ["unknown key 'train.stepz'"]),
        ("stage and YAML as arguments, disagreeing", ["train", "forward", REV],
         ["`biflow train forward` but", "says stage: reverse", f"run `biflow train {REV}`"]),
        ("stage without a YAML", ["train", "forward"], ["`biflow train forward` needs the job YAML"]),
        ("YAML given twice", ["train", FWD, "-c", FWD], ["got the YAML twice"]),
        ("YAML without a stage key", ["train", str(tmp / "nostage.yaml")], ["has no stage: forward|reverse key",
                                                                             "biflow train forward"]),
        ("tune YAML as the argument", ["tune", str(tmp / "nope.yaml")], ["not found", "nope.yaml"]),
        ("perceptual vgg without weights", ["train", REV, "--set", "reverse.perceptual_weight=0.1",
                                            "--set", "reverse.perceptual.network=vgg"],
         ["reverse.perceptual.network='vgg' needs reverse.perceptual.weights_path"]),
        ("perceptual weights missing", ["train", REV, "--set", "reverse.perceptual_weight=0.1", "--set",
                                        "reverse.perceptual.network=convnext", "--set",
                                        f"reverse.perceptual.weights_path={tmp}/convnext.pt"],
         [f"reverse.perceptual.weights_path: {tmp}/convnext.pt not found"]),
        ("perceptual resize too small", ["train", REV, "--set", "reverse.perceptual_weight=0.1", "--set",
                                         "reverse.perceptual.resize=32"],
         ["reverse.perceptual.resize=32 is too small for inception (min 75)"]),
        ("export missing checkpoint", ["export", "nope", str(tmp / "out.safetensors"), "--storage", str(runs)],
         ["CHECKPOINT='nope'", "no checkpoint"]),
        ("submit without http address", ["submit", FWD, "--address", "127.0.0.1:6379"],
         ["give the dashboard URL"]),
        ("submit with bad config", ["submit", FWD, "--address", "http://127.0.0.1:1", "--set", "flow.width=-3"],
         ["flow.width"]),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"), Path("/x"), "http://x", "http://x", "http://x")]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_fails_before_workers_naming_the_problem(case, no_workers, bad_run, s3_auth, s3_server,
                                                           gcs_server, tmp_path, monkeypatch):
    if case != "missing bucket":  # every other S3 call here uses keys the servers do not know
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEWRONGKEY0000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-FAKE-0000")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # `biflow submit` would set RAY_AUTH_MODE=token in this process before importing Ray, and the
    # session's later local Ray instances then fail to authenticate; the token logic has its own test
    import biflow.submit

    monkeypatch.setattr(biflow.submit, "_enable_token_auth", lambda: False)
    (tmp_path / "nostage.yaml").write_text("name: x\ntrain:\n  steps: 3\n")
    cases = _cases(tmp_path, bad_run, s3_auth, s3_server.endpoint, gcs_server.endpoint)
    _, args, expected = next(c for c in cases if c[0] == case)
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - t0
    output = result.output + (getattr(result, "stderr", "") or "")
    print(f"{case}: exit {result.exit_code} in {seconds:.1f}s: {output.strip()}")
    assert not isinstance(result.exception, AssertionError), output
    assert result.exit_code != 0, output
    for text in expected:
        assert text in output, (text, output)
    assert "hunter2" not in output and "wrong-secret-FAKE-0000" not in output
    assert "Traceback" not in output
    if case == "unreachable storage":  # the pre-flight check has seconds; only training I/O retries for minutes
        assert seconds < 10, f"{case} took {seconds:.1f}s"


def test_run_storage_comes_from_biflow_storage_on_fleet_nodes(no_workers, bad_run, monkeypatch):
    """Launcher nodes export BIFLOW_STORAGE (the fleet's bucket): `biflow train` without
    --storage uses it, over the job's ray.storage. Seen here through the run it finds there."""
    monkeypatch.setenv("BIFLOW_STORAGE", str(bad_run))
    result = CliRunner().invoke(app, ["train", "forward", "-c", FWD, "--name", "four", "--workers", "2"])
    assert result.exit_code != 0 and "ray.workers=2" in result.output, result.output
    assert "checkpointed with 4 workers" in result.output and str(bad_run) in result.output


# ---------------------------------------------------------------------------
# Security defaults
# ---------------------------------------------------------------------------


def test_local_ray_dashboard_is_loopback_only_and_auth_is_never_disabled(monkeypatch):
    import ray

    from biflow.config import load_config
    from biflow.train import launch

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launch.init_ray(None, load_config(FWD))
    (local,) = calls
    assert local["address"] == "local"
    assert local.get("include_dashboard") is False or local.get("dashboard_host") == "127.0.0.1"
    assert local.get("dashboard_host", "127.0.0.1") == "127.0.0.1"
    # cluster mode: joins with the caller's auth settings, never turning token auth off
    launch.init_ray("ray://10.0.0.1:10001", load_config(FWD))
    assert "runtime_env" not in calls[1]  # the cluster's (or the submitted job's) own environment applies
    assert "RAY_AUTH_MODE" not in launch.worker_env() and "RAY_AUTH_MODE" not in calls[1]
    # cluster configs keep token auth on every node (their dashboards are reached by tunnel only)
    assert "RAY_AUTH_MODE=token" in REPO.joinpath("cluster/aws.yaml").read_text()
    # KubeRay: the operator turns token auth on for head, workers and autoscaler (spec.authOptions)
    import yaml

    cluster = yaml.safe_load(REPO.joinpath("cluster/kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load(REPO.joinpath("cluster/kuberay/rayjob.yaml").read_text())
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for path in [*REPO.joinpath("cluster").rglob("*"), *REPO.joinpath("infra").rglob("*"),
                 *REPO.joinpath("jobs").rglob("*")]:
        if path.is_file() and path.suffix in (".yaml", ".yml", ".tf", ".py", ".sh", ".json", ".tpl", ".j2"):
            text = path.read_text(errors="replace")
            assert not re.search(r"RAY_AUTH_MODE\W{0,3}(value:\s*)?disabled", text), path


def test_submit_reads_the_token_from_the_environment(tmp_path):
    """In a child process: Ray caches auth settings per process, so this one's environment stays untouched."""
    import subprocess
    import sys

    probe = ("import json, os, pathlib; from biflow import submit; on = submit._enable_token_auth(); "
             "spec = submit.build_job(os.environ['JOB'], None, pathlib.Path(os.environ['WORK']), upload_code=False); "
             "print(json.dumps({'on': on, 'mode': os.environ.get('RAY_AUTH_MODE'), 'env': spec['runtime_env'], "
             "'yaml': (pathlib.Path(os.environ['WORK']) / 'job.yaml').read_text()}))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(JOB=FWD, RAY_AUTH_TOKEN_PATH=str(tmp_path / "no-token-file"))
    results = []
    for token in (None, "fake-token-for-test"):
        env = {**base, "WORK": str(tmp_path / f"w{len(results)}")}
        Path(env["WORK"]).mkdir()
        if token:
            env["RAY_AUTH_TOKEN"] = token
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    without, with_token = results
    assert without["on"] is False and without["mode"] is None
    assert with_token["on"] is True and with_token["mode"] == "token"
    # the token is not forwarded into the job's environment or its config
    assert "fake-token-for-test" not in json.dumps(with_token["env"]) + with_token["yaml"]
