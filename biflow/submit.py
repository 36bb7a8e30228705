"""`biflow submit JOB.yaml --address http://HEAD:8265`: run a training job on a
Ray cluster through Ray's job submission API.

The job config is validated here first (a typo fails on the laptop, not after
a cluster queue), then the resolved config travels as the job's working
directory and the local ``biflow`` package as a ``py_module``, so the cluster
runs exactly the code and config that were checked.

Auth: Ray clusters keep token auth on. The token comes from the environment
(``RAY_AUTH_TOKEN``) or Ray's token file (``~/.ray/auth_token``); it is sent in
a header by Ray's client and never printed, logged or written into the job.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from biflow.config import load_config, save_config
from biflow.errors import UserError

# Passed to the job when set here; credentials are deliberately not in this list:
# cluster nodes get cloud access from their instance role / service account (through the
# metadata service, so AWS_EC2_METADATA_DISABLED is not forwarded either).
FORWARDED_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _enable_token_auth() -> bool:
    """Turn on Ray's client token auth when a token is available; True if so."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return True
    return False


def build_job(job: str | Path, overrides: list[str] | None, workdir: Path, upload_code: bool) -> dict:
    """Validate the job config and lay out what the cluster will run."""
    cfg = load_config(job, overrides)
    save_config(cfg, workdir / "job.yaml")
    entrypoint = f"python -m biflow.cli train {cfg.stage} --config job.yaml"
    runtime_env: dict = {"working_dir": str(workdir),
                         "env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if upload_code:
        import biflow

        runtime_env["py_modules"] = [str(Path(biflow.__file__).parent)]
    return {"config": cfg, "entrypoint": entrypoint, "runtime_env": runtime_env}


def submit(job: str | Path, address: str, overrides: list[str] | None = None, follow: bool = True,
           upload_code: bool = True, timeout_s: float = 0, retry_s: float = 180, log: Callable[[str], None] = print) -> tuple[str, str]:
    """Submit, print the job id, follow logs until the job ends. Returns (job_id, status)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r}: give the dashboard URL of the cluster head, e.g. "
                        "http://127.0.0.1:8265 through an SSH tunnel or kubectl port-forward")
    token = _enable_token_auth()  # before importing ray: it reads RAY_AUTH_MODE at import
    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="biflow-job-") as tmp:
        spec = build_job(job, overrides, Path(tmp), upload_code)
        deadline = time.time() + retry_s
        while True:
            try:
                client = JobSubmissionClient(address)
                job_id = client.submit_job(entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"],
                                           metadata={"biflow_stage": spec["config"].stage,
                                                     "biflow_name": spec["config"].name})
                break
            except Exception as exc:  # ray raises several types (auth, connection, HTTP)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if "try again later" in first and time.time() < deadline:  # a head still starting its agent
                    log(f"cluster not ready ({first}); retrying")
                    time.sleep(3)
                    continue
                hint = "" if token else " (no Ray auth token found: set RAY_AUTH_TOKEN or create ~/.ray/auth_token)"
                raise UserError(f"could not submit to {address}: {first}{hint}") from None
    log(f"submitted job {job_id}: {spec['entrypoint']}")
    if not follow:
        return job_id, client.get_job_status(job_id).value
    status = follow_job(client, job_id, timeout_s, log)
    log(f"job {job_id} {status}")
    if status != "SUCCEEDED":
        raise UserError(f"job {job_id} ended {status}; `ray job logs {job_id}` shows the full log")
    return job_id, status


def follow_job(client, job_id: str, timeout_s: float, log: Callable[[str], None]) -> str:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.rstrip("\n").splitlines():
                log(line)

    deadline = time.time() + timeout_s if timeout_s else None
    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s or None))
    except asyncio.TimeoutError:
        pass
    while True:  # logs end when the job ends; the status may trail a moment
        status = client.get_job_status(job_id).value
        if status in TERMINAL or (deadline and time.time() > deadline):
            return status
        time.sleep(1)

