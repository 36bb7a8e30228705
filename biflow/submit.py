"""`biflow submit JOB.yaml --address http://HEAD:8265`: run a training job on a
Ray cluster through Ray's job submission API.

The job config is validated here first (a typo fails on the laptop, not after
a cluster queue), then the resolved config travels as the job's working
directory. The code is the cluster image's biflow (pinned with the image);
``--upload-code`` ships this checkout's ``biflow`` package as a ``py_module``
instead, over the image's, for trying local changes.

Idempotent: the job's ``submission_id`` is derived from where the run writes
(``ray.storage`` + ``name``, the checkpoint directory), so submitting the same
run again while a job for it is still pending or running reports that job
instead of starting a second writer on the same checkpoints. Once the earlier
job has ended, a resubmission (which resumes from the latest checkpoint) gets
the next id, ``<id>-r2``, ``<id>-r3`` ... (Ray never reuses a submission id).

Entrypoint resources (``entrypoint_num_cpus``/``_gpus``/``_memory``/
``_resources``: where the driver may run) and an extra ``runtime_env``
(merged over the one built here; ``env_vars`` are merged key by key) can be
passed.

The plain Ray equivalent, for clusters whose image already has biflow
(cluster/image), is::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --submission-id "$(python -m biflow.submit jobs/smoke-forward.yaml)" \\
        -- biflow train forward --config jobs/smoke-forward.yaml

(``python -m biflow.submit JOB.yaml [--set k=v ...]`` prints the id that
``biflow submit`` would use; see cluster/README.md).

Auth: Ray clusters keep token auth on. The token comes from the environment
(``RAY_AUTH_TOKEN``) or Ray's token file (``~/.ray/auth_token``); it is sent in
a header by Ray's client and never printed, logged or written into the job.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from biflow.config import load_config, save_config
from biflow.errors import UserError
from biflow.fleet import START_TIMEOUT_ENV

# Passed to the job when set here; credentials are deliberately not in this list:
# cluster nodes get cloud access from their instance role / service account (through the
# metadata service, so AWS_EC2_METADATA_DISABLED is not forwarded either).
FORWARDED_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
# Ray Train's controller inherits the job's environment (see biflow.fleet.START_TIMEOUT_ENV)
TRAIN_CONTROLLER_ENV = START_TIMEOUT_ENV
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _enable_token_auth() -> bool:
    """Turn on Ray's client token auth when a token is available; True if so."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return True
    return False


def submission_id(cfg: Any) -> str:
    """Deterministic Ray submission id of a run: one per checkpoint directory
    (``ray.storage``/``name``), whatever else the config says."""
    where = f"{cfg.ray.storage.rstrip('/')}/{cfg.name}"
    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-")[:40] or "run"
    return f"biflow-{slug}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def merge_runtime_env(base: dict, extra: dict | None) -> dict:
    """``extra`` over ``base``; ``env_vars`` merge key by key (extra wins)."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if key == "env_vars":
            if not isinstance(value, dict):
                raise UserError(f"runtime_env.env_vars must be a mapping, got {type(value).__name__}")
            out["env_vars"] = {**out.get("env_vars", {}), **{k: str(v) for k, v in value.items()}}
        elif key == "working_dir":
            raise UserError("runtime_env.working_dir is set by biflow submit (the validated job config); "
                            "use `ray job submit --working-dir` for a different one")
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_job(job: str | Path, overrides: list[str] | None, workdir: Path, upload_code: bool,
              runtime_env: dict | None = None) -> dict:
    """Validate the job config and lay out what the cluster will run."""
    cfg = load_config(job, overrides)
    save_config(cfg, workdir / "job.yaml")
    entrypoint = f"python -m biflow.cli train {cfg.stage} --config job.yaml"
    env: dict = {"working_dir": str(workdir),
                 "env_vars": {**TRAIN_CONTROLLER_ENV, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}}
    if upload_code:
        import biflow

        env["py_modules"] = [str(Path(biflow.__file__).parent)]
    return {"config": cfg, "entrypoint": entrypoint, "runtime_env": merge_runtime_env(env, runtime_env),
            "submission_id": submission_id(cfg)}


def _attempts(client, base: str) -> list:
    """Jobs of this run on the cluster: ``base`` and its ``-rN`` resubmissions, oldest first."""
    pattern = re.compile(rf"^{re.escape(base)}(-r(\d+))?$")
    found = []
    for info in client.list_jobs():
        m = pattern.match(info.submission_id or "")
        if m:
            found.append((int(m.group(2) or 1), info))
    return [info for _, info in sorted(found, key=lambda t: t[0])]


def _next_id(base: str, attempts: list) -> str:
    if not attempts:
        return base
    last = attempts[-1].submission_id
    n = int(last.rsplit("-r", 1)[1]) if last != base else 1
    return f"{base}-r{n + 1}"


def submit(job: str | Path, address: str, overrides: list[str] | None = None, follow: bool = True,
           upload_code: bool = False, timeout_s: float = 0, retry_s: float = 180, log: Callable[[str], None] = print,
           runtime_env: dict | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, entrypoint_memory: int | None = None,
           entrypoint_resources: dict[str, float] | None = None) -> tuple[str, str]:
    """Submit (or find the job already running this run), print its id, follow
    logs until the job ends. Returns (submission_id, status)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r}: give the dashboard URL of the cluster head, e.g. "
                        "http://127.0.0.1:8265 through an SSH tunnel or kubectl port-forward")
    token = _enable_token_auth()  # before importing ray: it reads RAY_AUTH_MODE at import
    from ray.job_submission import JobSubmissionClient

    entry_kwargs = {k: v for k, v in {"entrypoint_num_cpus": entrypoint_num_cpus,
                                      "entrypoint_num_gpus": entrypoint_num_gpus,
                                      "entrypoint_memory": entrypoint_memory,
                                      "entrypoint_resources": entrypoint_resources}.items() if v is not None}
    existing = None
    with tempfile.TemporaryDirectory(prefix="biflow-job-") as tmp:
        spec = build_job(job, overrides, Path(tmp), upload_code, runtime_env)
        base = spec["submission_id"]
        deadline = time.time() + retry_s
        while True:
            try:
                client = JobSubmissionClient(address)
                attempts = _attempts(client, base)
                active = [j for j in attempts if j.status.value not in TERMINAL]
                if active:  # this run already has a writer: report it, start nothing
                    existing = active[-1]
                    job_id = existing.submission_id
                    break
                job_id = client.submit_job(entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"],
                                           submission_id=_next_id(base, attempts),
                                           metadata={"biflow_stage": spec["config"].stage,
                                                     "biflow_name": spec["config"].name,
                                                     "biflow_storage": spec["config"].ray.storage},
                                           **entry_kwargs)
                break
            except Exception as exc:  # ray raises several types (auth, connection, HTTP)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if "try again later" in first and time.time() < deadline:  # a head still starting its agent
                    log(f"cluster not ready ({first}); retrying")
                    time.sleep(3)
                    continue
                if "already exists" in first and time.time() < deadline:  # a concurrent submit took the id
                    continue
                hint = "" if token else " (no Ray auth token found: set RAY_AUTH_TOKEN or create ~/.ray/auth_token)"
                raise UserError(f"could not submit to {address}: {first}{hint}") from None
    if existing is not None:
        log(f"job {job_id} for run {spec['config'].name!r} is already {existing.status.value}; "
            "not submitting a second one (stop it with `ray job stop " + job_id + "`)")
    else:
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



def _main(argv: list[str]) -> int:
    """``python -m biflow.submit JOB.yaml [--set k=v ...]``: print the run's submission id."""
    if not argv or argv[0].startswith("-"):
        print("usage: python -m biflow.submit JOB.yaml [--set key=value ...]", file=sys.stderr)
        return 2
    sets = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    try:
        print(submission_id(load_config(argv[0], sets)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
