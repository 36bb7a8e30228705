"""Multi-node clusters on one machine: nodes lost mid-run, autoscaling from zero.

Each scenario runs in its own Python process (``python -m tests.test_nodes NAME``)
with a private ``RAY_TMPDIR``, so its Ray cluster is found by nobody else on the
machine, and every process it started (they all carry that directory in their
command line) is ended by its pid afterwards; ``ray stop`` is never run. The
scenario writes what it measured to a JSON file; the tests below assert on it.
Shards and run storage live on the S3 server (moto): no node relies on a shared
local path.

One scenario per test, each on a cluster of its own (``ray.cluster_utils.Cluster``:
a head with no CPUs plus worker nodes); a killed node's replacement boots in the
background while the scenario watches the run; the run is followed by one LIST of
its checkpoints a second (TensorBoard files are read only once a checkpoint is in):

- ``forward_node_loss``: the forward stage (2 DeepSpeed ZeRO-2 workers spread over
  three 2-CPU nodes) loses a node hosting a training worker, hard, mid-run. It is
  in the default run (CI); the other scenarios are ``slow`` (``make test-nodes``).
- ``reverse_node_loss``: the reverse stage loses the one node with CPUs free for
  Ray Data (the workers' nodes have 1 CPU each, all taken by training).
- ``tune_node_loss``: a Tune search loses a node hosting a trial's training worker.
- ``preemption``: three spot reclaims, each announced through the instance metadata,
  drained by ``biflow.fleet.spot_notice``, answered by a just-in-time checkpoint,
  in a run with ``max_failures=0``.
- ``autoscaling``: ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``
  (what ``ray.cluster_utils.AutoscalingCluster.start`` runs, without its
  ``ray stop --force``), node types generated from ``cluster/aws.yaml`` by
  :func:`biflow.cluster.fake_node_types`. A job asking for 2 workers of
  ``{sim_gpu: 1}`` on ``A10G`` scales the cluster up from 0, loses a node, which
  is replaced, and finishes; the idle nodes are then removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"

pytestmark = pytest.mark.nodes

# A failed node is seen as dead after 5 health checks 1 s apart (default 5 x 3 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# The head: no CPUs, no dashboard, and its dashboard agent on a port of its own choosing: the
# default 52365 is often held by another Ray instance on the machine, and a raylet whose agent
# cannot listen waits 15 s for its port file and dies (ray-project/ray#65983).
HEAD_ARGS = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": 150 * 1024**2,
             "dashboard_agent_listen_port": 0, "_system_config": SYSTEM_CONFIG}


# ---------------------------------------------------------------------------
# Processes: every one a scenario started carries its RAY_TMPDIR
# ---------------------------------------------------------------------------


def processes_with(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_processes_with(marker: str) -> int:
    """SIGKILL, by pid, every process whose command line names ``marker`` (a scenario's
    private temp dir): the Ray processes that scenario started and nothing else."""
    import psutil

    procs = processes_with(marker)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def run_scenario(name: str, args: dict[str, Any], tmp_path: Path, timeout: float,
                 env_extra: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run one scenario in its own process; returns (what it measured, its log)."""
    marker = tempfile.mkdtemp(prefix="bfn-", dir="/tmp")  # short: Ray's socket paths live under it
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    env = {**os.environ, "RAY_TMPDIR": marker, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu", "AWS_EC2_METADATA_DISABLED": "true", "RAY_DEDUP_LOGS": "0",
           # a worker group may wait for a node to join (or be launched) longer than Train's default 60 s
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
           **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "tests.test_nodes", name, json.dumps(args), str(out)],
                                  cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        left = kill_processes_with(marker)
    text = log.read_text(errors="replace")
    result = json.loads(out.read_text()) if out.exists() else {}
    if rc != 0:  # keep Ray's logs (raylet, monitor, workers) beside the scenario's own
        for session in Path(marker, "ray").glob("session_2*"):
            shutil.copytree(session / "logs", tmp_path / f"ray-logs-{session.name}", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True)
    shutil.rmtree(marker, ignore_errors=True)
    result["scenario_seconds"] = time.time() - t0
    result["leftover_processes"] = left
    print(f"{name}: rc {rc}, {result['scenario_seconds']:.0f}s, {left} leftover Ray processes ended")
    if rc != 0 and not result.get("done"):
        pytest.fail(f"scenario {name} failed (rc {rc}; Ray's logs in {tmp_path}); log tail:\n{text[-6000:]}")
    return result, text


# ---------------------------------------------------------------------------
# Inside a scenario process
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Recorder:
    """What a scenario measured, rewritten to its JSON file after every phase."""

    def __init__(self, path: str):
        self.path, self.data, self.t0 = path, {}, time.time()

    def now(self) -> float:
        return round(time.time() - self.t0, 2)

    def save(self, **values: Any) -> None:
        self.data.update(values)
        Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))


def s3_fs(uri: str, endpoint: str):
    from biflow.data import storage

    return storage.resolve(uri, endpoint, "", check=False)


def committed(run_uri: str, endpoint: str) -> list[int]:
    from biflow.train import checkpoint as ckpt_io

    fs, path = s3_fs(run_uri, endpoint)
    return [s for s, _ in ckpt_io._checkpoints_in(fs, path)]


def checkpoint_meta(run_uri: str, endpoint: str) -> dict[int, dict]:
    from biflow.data import storage
    from biflow.train import checkpoint as ckpt_io

    fs, path = s3_fs(run_uri, endpoint)
    out = {}
    for step, name in ckpt_io._checkpoints_in(fs, path):
        meta = json.loads(storage.read_bytes(fs, storage.join(path, name, ckpt_io.METADATA)))
        out[step] = {k: meta.get(k) for k in ("step", "samples_seen", "ema_updates", "world_size", "stage")}
    return out


def tb_attempts(run_uri: str, endpoint: str, tag: str = "train/loss") -> list[dict[int, float]]:
    """``tag`` per TensorBoard event file in RUN/tensorboard (one file per attempt), by first step."""
    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs, path = s3_fs(run_uri, endpoint)
    local = Path(tempfile.mkdtemp(prefix="tb-"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path + "/tensorboard", recursive=False, allow_not_found=True))
        files = [i.path for i in infos if "tfevents" in i.path]
        out = []
        for i, remote in enumerate(files):
            target = local / f"{i}" / Path(remote).name
            target.parent.mkdir()
            with fs.open_input_stream(remote) as src:
                target.write_bytes(src.read())
            acc = EventAccumulator(str(target))
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                out.append({e.step: e.value for e in acc.Scalars(tag)})
        return sorted(out, key=min)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def tb_max_step(run_uri: str, endpoint: str) -> int:
    try:
        return max((max(a) for a in tb_attempts(run_uri, endpoint)), default=0)
    except Exception:  # noqa: BLE001 - a half-written object while polling
        return 0


def actors_by_node() -> dict[str, list[str]]:
    """Class names of the live actors on each node (the GCS actor table; no dashboard needed)."""
    from ray._private import state

    out: dict[str, list[str]] = {}
    for info in state.actors().values():
        if info["State"] == "ALIVE":
            out.setdefault(info["Address"]["NodeID"], []).append(info["ActorClassName"])
    return out


def alive_nodes() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def wait_for(cond: Callable[[], Any], timeout: float, every: float = 0.25, what: str = "") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Background:
    """Run ``fn`` in a thread (``fit`` blocks); ``join`` returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"still running after {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.value


def retrying(start: Callable[[], Any], what: str, attempts: int = 3):
    """Start a node, again if it timed out: on a loaded machine a raylet gives up when its
    dashboard agent takes more than 15 s to report its ports (ray-project/ray#65983). What a
    failed start left running is ended with the scenario's other processes."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as exc:
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            print(f"[nodes] {what} did not start (attempt {attempt}): {exc}; again", flush=True)


def stage_job(stage: str, overrides: list[str]):
    from biflow.config import load_config

    return load_config(JOBS / f"smoke-{stage}.yaml", overrides)


def run_with_node_loss(rec: Recorder, key: str, run_uri: str, endpoint: str, fit_fn: Callable[[], Any],
                       kill_after_step: int, choose: Callable[[dict[str, list[str]]], str],
                       kill: Callable[[str], None], timeout: float = 420) -> Any:
    """Start ``fit_fn``; once the checkpoint at ``kill_after_step`` is committed and its
    TensorBoard events are in storage, hard-kill the node ``choose`` picks from the live
    actors; return ``fit_fn``'s result. Records what was killed and when."""
    t0 = time.time()
    job = Background(fit_fn)
    # one LIST a second until the checkpoint is committed; only then read the TensorBoard events
    wait_for(lambda: not job.alive() or kill_after_step in committed(run_uri, endpoint),
             timeout, every=1.0, what=f"{key}: checkpoint {kill_after_step} committed")
    wait_for(lambda: not job.alive() or tb_max_step(run_uri, endpoint) >= kill_after_step,
             60, every=2.0, what=f"{key}: TensorBoard events of step {kill_after_step} uploaded")
    if not job.alive():
        job.join(1)
        raise AssertionError(f"{key}: the run ended before the node could be killed")
    placement = actors_by_node()
    victim = choose(placement)
    before = committed(run_uri, endpoint)
    workers = worker_titles(victim)
    t_kill = time.time()
    kill(victim)
    kill_s = time.time() - t_kill
    time.sleep(2)  # a commit marker a surviving rank 0 was writing at the kill lands now, or never
    after = committed(run_uri, endpoint)
    wait_for(lambda: victim not in alive_nodes(), 60, what=f"{key}: node {victim} marked dead")
    t_dead = time.time()
    rec.save(**{key: {"killed_node": victim, "killed_node_actors": sorted(placement.get(victim, [])),
                      "killed_node_workers": workers,
                      "placement": {n: sorted(a) for n, a in placement.items()},
                      "committed_at_kill": before, "committed_after_kill": after,
                      "kill_at_s": round(t_kill - t0, 2), "kill_took_s": round(kill_s, 2),
                      "dead_after_s": round(t_dead - t_kill, 2)}})
    result = job.join(timeout)
    rec.data[key]["wall_s"] = round(time.time() - t0, 2)
    return result


def stage_facts(result, run_uri: str, endpoint: str) -> dict[str, Any]:
    return {"final_step": int(result.metrics["step"]), "start_step": int(result.metrics["start_step"]),
            "skipped_steps": int(result.metrics["skipped_steps"]), "committed": committed(run_uri, endpoint),
            "meta": checkpoint_meta(run_uri, endpoint), "tb": tb_attempts(run_uri, endpoint)}


def start_cluster(rec: Recorder, workers: int = 3, cpus: int = 2):
    """A head with no CPUs and ``workers`` nodes; returns (cluster, nodes by id)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    retrying(lambda: cluster.add_node(**HEAD_ARGS), "head")
    nodes: dict[str, Any] = {}

    def add_node() -> str:
        node = retrying(lambda: cluster.add_node(num_cpus=cpus, object_store_memory=100 * 1024**2), "worker node")
        nodes[node.node_id] = node
        return node.node_id

    for _ in range(workers):
        add_node()
    ray.init(address=cluster.address, log_to_driver=True)
    rec.save(cluster_up_s=rec.now(), head_cpus=0, worker_nodes=len(nodes), node_cpus=cpus)
    return cluster, nodes


def spawn_node(address: str, cpus: int, resources: dict[str, float] | None = None) -> str:
    """Start a node with ``ray start`` in a process of its own and return its id at once:
    the scenario does not wait for it (``Cluster.add_node`` blocks, and only from the main
    thread). The node id is chosen here (Ray's testing override), so it can be killed later."""
    node_id = secrets.token_hex(28)
    env = {**os.environ, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", f"--address={address}", f"--num-cpus={cpus}",
           f"--resources={json.dumps(resources or {})}", "--object-store-memory=100000000",
           "--disable-usage-stats", "--dashboard-agent-listen-port=0"]
    subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return node_id


def raylet_of(node_id: str):
    """The raylet process of a node on this machine (by the socket the GCS lists), or None."""
    import ray

    socket_name = next(n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == node_id)
    for proc in processes_with(socket_name):
        try:
            if "raylet" in proc.name():
                return proc
        except Exception:  # psutil.Error: gone meanwhile
            continue
    return None


def worker_titles(node_id: str) -> list[str]:
    """The process titles of a node's Ray workers (``ray::<task or actor>``, ``ray::IDLE``):
    what ran there, tasks included, which the actor table does not show."""
    proc = raylet_of(node_id)
    titles = []
    for child in proc.children(recursive=True) if proc else []:
        try:
            title = (child.cmdline() or [""])[0]
        except Exception:  # psutil.Error
            continue
        if title.startswith("ray::"):
            titles.append(title.split(" ")[0])
    return sorted(titles)


def kill_raylet(node_id: str) -> bool:
    """SIGKILL a node's raylet and everything under it (its workers and agents): as a machine
    that vanishes, for any kind of node. Returns False when the raylet had already gone: a
    node drained with a deadline shuts its raylet down itself once the deadline passes and
    its work is gone."""
    import psutil

    proc = raylet_of(node_id)
    if proc is not None:
        try:
            victims = [proc, *proc.children(recursive=True)]
            for p in victims:
                p.kill()
            psutil.wait_procs(victims, timeout=3)  # children reparented to init may linger as zombies
            return True
        except psutil.Error:
            pass
    if node_id not in alive_nodes():
        return False
    raise RuntimeError(f"no raylet found for live node {node_id}")


def kill_and_replace_later(cluster, nodes: dict, node_id: str, rec: Recorder, cpus: int = 2,
                           resources: dict[str, float] | None = None, attempts: int = 3) -> None:
    """SIGKILL a node, as a spot reclaim does, and bring up its replacement in a background
    thread: the scenario goes on watching the run while the new node boots. A replacement
    that has not joined within a minute (on a loaded machine a raylet can give up waiting
    for its dashboard agent, ray-project/ray#65983) is ended and started again."""
    gone_already = False
    if node_id in nodes:
        cluster.remove_node(nodes.pop(node_id), allow_graceful=False)
    else:
        gone_already = not kill_raylet(node_id)
    entry: dict[str, Any] = {"removed": node_id, "at_s": rec.now(), "tries": [], "gone_already": gone_already}
    rec.data.setdefault("replacements", []).append(entry)

    def replace():
        for _ in range(attempts):
            added = spawn_node(cluster.address, cpus, resources)
            entry["tries"].append(added)
            try:
                wait_for(lambda: added in alive_nodes(), 60, every=2.0, what=f"node {added} joined")
                entry.update(added=added, joined_at_s=rec.now())
                return
            except TimeoutError:
                try:  # a raylet that gave up is gone already; one still starting is ended with the scenario
                    kill_raylet(added)
                except (RuntimeError, StopIteration):
                    pass

    threading.Thread(target=replace, daemon=True).start()


NODE_RUN = ["ray.max_failures=3", "train.log_every=1", "train.keep_checkpoints=20", "data.shuffle_buffer=64"]


def node_loss_common(data_uri: str, endpoint: str, storage_uri: str) -> list[str]:
    return [f"data.uri={data_uri}", f"data.endpoint={endpoint}", f"ray.storage={storage_uri}",
            f"ray.storage_endpoint={endpoint}", *NODE_RUN]


def train_nodes(placement: dict[str, list[str]]) -> list[str]:
    return sorted(n for n, classes in placement.items() if "RayTrainWorker" in classes)


def scenario_forward_node_loss(rec: Recorder, data_uri: str, endpoint: str, bucket: str) -> None:
    """The forward stage (2 DeepSpeed ZeRO-2 workers spread over nodes) loses a node hosting a
    training worker, hard, mid-run; a fresh node joins in the background."""
    import ray

    from biflow.train import fit

    cluster, nodes = start_cluster(rec)
    storage_uri = f"s3://{bucket}/runs"
    steps, every = 24, 6
    fwd = stage_job("forward", [*node_loss_common(data_uri, endpoint, storage_uri), "ray.placement_strategy=SPREAD",
                                f"train.steps={steps}", f"train.checkpoint_every={every}"])
    result = run_with_node_loss(rec, "forward", f"{storage_uri}/nodes-fwd", endpoint,
                                lambda: fit(fwd, name="nodes-fwd", address=cluster.address), every,
                                choose=lambda p: train_nodes(p)[0],
                                kill=lambda n: kill_and_replace_later(cluster, nodes, n, rec))
    rec.data["forward"].update(stage_facts(result, f"{storage_uri}/nodes-fwd", endpoint),
                               train_nodes_before=len(train_nodes(rec.data["forward"]["placement"])))
    rec.save()
    ray.shutdown()
    cluster.shutdown()


def scenario_reverse_node_loss(rec: Recorder, data_uri: str, endpoint: str, bucket: str) -> None:
    """The reverse stage loses the node that does all of Ray Data's work. Two trainer nodes
    of 1 CPU (a ``trainer`` resource the workers ask for: no CPU left there) and one data
    node of 2 CPUs, the only CPUs free for Ray Data's read and decode tasks. A short forward
    run first gives the reverse stage its flow."""
    import ray

    from biflow.train import fit

    cluster, nodes = start_cluster(rec, workers=0)

    def add(kind: str) -> str:
        node = retrying(lambda: cluster.add_node(num_cpus=1 if kind == "trainer" else 2,
                                                 resources={"trainer": 1} if kind == "trainer" else {},
                                                 object_store_memory=100 * 1024**2), f"{kind} node")
        nodes[node.node_id] = node
        return node.node_id

    trainers = [add("trainer"), add("trainer")]
    data_node = add("data")
    rec.save(trainer_nodes=trainers, data_node=data_node)
    storage_uri = f"s3://{bucket}/runs"
    common = [*node_loss_common(data_uri, endpoint, storage_uri), "ray.resources_per_worker={trainer: 1}"]
    fit(stage_job("forward", [*common, "train.steps=6", "train.checkpoint_every=6"]), name="nodes-fwd",
        address=cluster.address)
    steps, every = 24, 6
    rev = stage_job("reverse", [*common, f"train.steps={steps}", f"train.checkpoint_every={every}",
                                "train.forward_checkpoint=nodes-fwd"])
    result = run_with_node_loss(rec, "reverse", f"{storage_uri}/nodes-rev", endpoint,
                                lambda: fit(rev, name="nodes-rev", address=cluster.address), every,
                                choose=lambda p: data_node,
                                kill=lambda n: kill_and_replace_later(cluster, nodes, n, rec))
    rec.data["reverse"].update(stage_facts(result, f"{storage_uri}/nodes-rev", endpoint))
    rec.save()
    ray.shutdown()
    cluster.shutdown()


def scenario_tune_node_loss(rec: Recorder, data_uri: str, endpoint: str, bucket: str) -> None:
    """A Tune search loses a node hosting a trial's training worker (not the trial itself)."""
    import csv

    import ray

    from biflow.tune import search

    cluster, nodes = start_cluster(rec)
    name = "nodes-search"
    tune_steps, tune_every = 12, 4
    overrides = [f"base.data.uri={data_uri}", f"base.data.endpoint={endpoint}", f"storage_endpoint={endpoint}",
                 "num_samples=2", "scheduler.kind=none", f"base.train.steps={tune_steps}",
                 f"base.train.checkpoint_every={tune_every}", "base.train.log_every=1",
                 "base.train.keep_checkpoints=10", "base.ray.max_failures=3", "base.ray.placement_strategy=SPREAD"]
    runs = f"s3://{bucket}/tune/{name}/runs"
    out_dir = Path(tempfile.mkdtemp(prefix="tune-out-"))
    state: dict[str, str] = {}

    def first_trial_run() -> str:
        import pyarrow.fs as pafs

        fs, path = s3_fs(runs, endpoint)
        dirs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                      if i.type == pafs.FileType.Directory)
        if dirs:
            state["run"] = f"{runs}/{Path(dirs[0]).name}"
        return state.get("run", "")

    t0 = time.time()
    job = Background(lambda: search(ROOT / "jobs" / "tune" / "smoke.yaml", overrides, name=name,
                                    storage=f"s3://{bucket}/tune", address=cluster.address, out=out_dir))
    wait_for(lambda: not job.alive() or (first_trial_run() and tune_every in committed(state["run"], endpoint)),
             420, every=1.0, what="tune: the first trial's checkpoint")
    wait_for(lambda: not job.alive() or tb_max_step(state["run"], endpoint) >= tune_every, 60, every=2.0,
             what="tune: the first trial's TensorBoard events")
    assert job.alive(), "the search ended before the node could be killed"
    placement = actors_by_node()
    victim = next(n for n in train_nodes(placement) if "TrainController" not in placement[n])
    info = {"killed_node": victim, "killed_node_actors": sorted(placement[victim]), "run": state["run"],
            "committed_at_kill": committed(state["run"], endpoint), "kill_at_s": round(time.time() - t0, 2)}
    kill_and_replace_later(cluster, nodes, victim, rec)
    summary = job.join(600)
    with open(out_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    info.update(wall_s=round(time.time() - t0, 2), rows=rows, summary_trials=summary.get("trials"),
                committed=committed(state["run"], endpoint), tb=tb_attempts(state["run"], endpoint),
                full_steps=tune_steps, every=tune_every)
    rec.save(tune=info, nodes_at_end=len(alive_nodes()))
    ray.shutdown()
    cluster.shutdown()


def scenario_autoscaling(rec: Recorder, data_uri: str, endpoint: str, bucket: str) -> None:
    import ray

    from biflow.cluster import SIM_GPU, fake_autoscaling_config, fake_node_types

    tmp = Path(os.environ["RAY_TMPDIR"])
    ip = ray._private.services.get_node_ip_address()
    port = free_port()
    types = fake_node_types(max_workers=2)
    config = fake_autoscaling_config(types, f"{ip}:{port}", max_workers=4, idle_timeout_minutes=0.1)
    config_path = tmp / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
           f"--autoscaling-config={config_path}", "--object-store-memory=150000000", "--disable-usage-stats",
           f"--system-config={json.dumps(SYSTEM_CONFIG)}", "--dashboard-agent-listen-port=0",
           f"--ray-client-server-port={free_port()}"]

    def start_head():
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
        if started.returncode:
            kill_processes_with(str(tmp))  # what the failed start left (nothing else has started yet)
            raise RuntimeError(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}")

    retrying(start_head, "ray start --head")
    ray.init(address=f"{ip}:{port}", log_to_driver=True)
    head = ray.get_runtime_context().get_node_id()
    rec.save(head_up_s=rec.now(), node_types={k: v["resources"] for k, v in types.items()},
             worker_nodes_at_start=len([n for n in alive_nodes() if n != head]))

    timeline: list[dict[str, Any]] = []
    watching = threading.Event()

    def watch():
        seen: dict[str, dict] = {}
        while True:
            last = watching.is_set()  # one more poll after the stop: the scale-down's last leaves
            try:
                now = {n: r for n, r in alive_nodes().items() if n != head}
            except Exception:  # noqa: BLE001
                now = seen
            for n in now.keys() - seen.keys():
                timeline.append({"t": rec.now(), "event": "join", "node": n,
                                 "resources": {k: v for k, v in now[n].items() if "memory" not in k}})
            for n in seen.keys() - now.keys():
                timeline.append({"t": rec.now(), "event": "leave", "node": n})
            seen = now
            if last:
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    from biflow.train import fit

    storage_uri = f"s3://{bucket}/runs"
    steps, every = 16, 4
    job_cfg = stage_job("forward", [
        f"data.uri={data_uri}", f"data.endpoint={endpoint}", f"ray.storage={storage_uri}",
        f"ray.storage_endpoint={endpoint}", "ray.max_failures=3", "train.log_every=1", "train.keep_checkpoints=20",
        "data.shuffle_buffer=64", f"train.steps={steps}", f"train.checkpoint_every={every}",
        f"ray.resources_per_worker={{{SIM_GPU}: 1}}", "ray.accelerator_type=A10G"])
    t_submit = rec.now()
    run_uri = f"{storage_uri}/autoscale-fwd"

    def choose(placement):
        return min(n for n, c in placement.items() if "RayTrainWorker" in c)

    result = run_with_node_loss(rec, "run", run_uri, endpoint, lambda: fit(job_cfg, name="autoscale-fwd",
                                address=f"{ip}:{port}"), every, choose=choose, kill=kill_raylet, timeout=480)
    t_done = rec.now()
    rec.data["run"].update(stage_facts(result, run_uri, endpoint), submit_at_s=t_submit, done_at_s=t_done)
    rec.save(timeline=timeline)
    try:
        wait_for(lambda: not [n for n in alive_nodes() if n != head], 120, every=0.5, what="scale-down to 0")
        scaled_down = rec.now()
    except TimeoutError:
        scaled_down = None
    watching.set()
    watcher.join(5)
    monitor_log = "\n".join(p.read_text(errors="replace")
                            for p in (tmp / "ray" / "session_latest" / "logs").glob("monitor.*"))
    launches = [line.split("StandardAutoscaler: ", 1)[-1] for line in monitor_log.splitlines()
                if "Adding" in line and "node(s) of type" in line]
    terminations = [line.split("StandardAutoscaler: ", 1)[-1] for line in monitor_log.splitlines()
                    if "Terminating" in line or "terminating" in line.lower() and "node" in line]
    rec.save(timeline=timeline, scaled_down_at_s=scaled_down, launches=launches, terminations=terminations[:40])
    ray.shutdown()


def steps_logged(path: Path) -> list[tuple[int, float]]:
    """``(step, time)`` lines of a :class:`biflow.train.callbacks.StepLog` file (rank 0, every attempt)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), float(parts[1])))
    return out


def attempts_of(log: list[tuple[int, float]]) -> list[list[int]]:
    """The step log split where the step goes back (a restarted attempt); a step written
    twice in a row counts once."""
    runs: list[list[int]] = []
    for step, _ in log:
        if runs and step == runs[-1][-1]:
            continue
        if not runs or step < runs[-1][-1]:
            runs.append([])
        runs[-1].append(step)
    return runs


def scenario_preemption(rec: Recorder, data_uri: str, endpoint: str, bucket: str) -> None:
    """Three spot reclaims of a node hosting a training worker, in a run with max_failures=0.

    Each: the instance metadata (tests/imds.py) posts a notice ``notice_s`` ahead; the
    watcher (``biflow.fleet.spot_notice``) drains the node with the preemption reason and the
    notice time less its margin as deadline; the loop sees ``ray.train.get_preemption_info()``
    and commits a just-in-time checkpoint; when the deadline has passed, the node is killed,
    as EC2 does at the notice time (Ray counts a drained node's death as a preemption only
    past its deadline), and a replacement joins."""
    import ray

    from biflow.fleet import spot_notice
    from biflow.train import fit
    from biflow.train.callbacks import StepLog
    from tests.imds import FakeIMDS, notice_in, serve

    cluster, nodes = start_cluster(rec)
    storage_uri = f"s3://{bucket}/runs"
    run_uri = f"{storage_uri}/preempt"
    # paced to 5 steps/s: a notice window (15 s) holds ~75 steps; 200 outlast three reclaims,
    # each 10 steps into an attempt (the third's checkpoint near step 50, its kill before 130)
    steps, notice_s, margin_s, pace_s, after = 200, 15, 5, 0.2, 10
    cfg = stage_job("forward", [
        f"data.uri={data_uri}", f"data.endpoint={endpoint}", f"ray.storage={storage_uri}",
        f"ray.storage_endpoint={endpoint}", "ray.placement_strategy=SPREAD", "ray.max_failures=0",
        "train.log_every=4", "train.keep_checkpoints=20", "data.shuffle_buffer=64", f"train.steps={steps}",
        f"train.checkpoint_every={steps}", "train.preemption_check_every=1"])
    step_log = Path(os.environ["RAY_TMPDIR"]) / "steps.log"
    server, url = serve()
    t0 = time.time()
    job = Background(lambda: fit(cfg, name="preempt", address=cluster.address,
                                 callbacks=StepLog(str(step_log), pace_s=pace_s)))
    events = []
    t_kill = 0.0
    for _ in range(3):  # each once the attempt running has taken `after` steps
        wait_for(lambda: not job.alive() or len([s for s, t in steps_logged(step_log) if t > t_kill]) >= after,
                 420, every=0.5, what=f"{after} steps of the running attempt")
        assert job.alive(), "the run ended before the preemption"
        placement = actors_by_node()
        victim = next(n for n, c in sorted(placement.items()) if "RayTrainWorker" in c and "TrainController" not in c)
        before = committed(run_uri, endpoint)
        FakeIMDS.notice = notice_in(notice_s)
        t_notice = time.time()
        step_at_notice = steps_logged(step_log)[-1][0]
        deadline = spot_notice.watch(spot_notice.Metadata(url), node_id=victim, poll_s=0.1, margin_s=margin_s)
        FakeIMDS.notice = None
        jit = wait_for(lambda: [s for s in committed(run_uri, endpoint) if s not in before], notice_s, every=1,
                       what="the just-in-time checkpoint")
        t_jit = time.time()
        time.sleep(max(0.0, deadline - time.time()))  # EC2 stops the instance at the notice time
        kill_and_replace_later(cluster, nodes, victim, rec)
        t_kill = time.time()
        resumed = wait_for(lambda: [s for s, t in steps_logged(step_log) if t > t_kill], 420, every=1,
                           what="the run going on after the preemption")
        events.append({"node": victim, "actors": sorted(placement[victim]), "step_at_notice": step_at_notice,
                       "jit_checkpoint": jit, "committed_before": before,
                       "jit_after_notice_s": round(t_jit - t_notice, 2), "killed_after_notice_s": round(t_kill - t_notice, 2),
                       "drain_deadline_in_s": round(deadline - margin_s - t_notice, 2),
                       "first_step_after_kill": resumed[0], "resumed_after_kill_s":
                           round(next(t for s, t in steps_logged(step_log) if t > t_kill) - t_kill, 2)})
        rec.save(preemptions=events)
    result = job.join(600)
    server.shutdown()
    log = steps_logged(step_log)
    rec.save(preemptions=events, final_step=int(result.metrics["step"]), start_step=int(result.metrics["start_step"]),
             committed=committed(run_uri, endpoint), attempts=attempts_of(log), run_wall_s=round(time.time() - t0, 2),
             max_failures=0)
    ray.shutdown()
    cluster.shutdown()


def scenario_prepare(rec: Recorder, source: str, uri: str, endpoint: str) -> None:
    """Shards for the other scenarios, made by ``prepare_data`` on a one-node cluster of its own."""
    import ray
    from ray.cluster_utils import Cluster

    from biflow.data.shards import prepare_data

    cluster = Cluster()
    retrying(lambda: cluster.add_node(**{**HEAD_ARGS, "num_cpus": 2}), "head")
    ray.init(address=cluster.address)
    manifest = prepare_data(source, uri, "fashion-mnist", limit=512, splits=["train"], endpoint=endpoint,
                            progress=False)
    rec.save(records=manifest.data["splits"]["train"]["records"])
    ray.shutdown()
    cluster.shutdown()


SCENARIOS = {"prepare": scenario_prepare, "forward_node_loss": scenario_forward_node_loss,
             "reverse_node_loss": scenario_reverse_node_loss, "tune_node_loss": scenario_tune_node_loss,
             "autoscaling": scenario_autoscaling, "preemption": scenario_preemption}


def main(argv: list[str]) -> None:
    name, args, out = argv[0], json.loads(argv[1]), argv[2]
    rec = Recorder(out)
    rec.save(scenario=name, load_average_start=os.getloadavg())
    SCENARIOS[name](rec, **args)
    rec.save(done=True, total_s=rec.now(), load_average_end=os.getloadavg())


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


def assert_resumed_without_loss(facts: dict[str, Any], steps: int, every: int, batch: int = 32, workers: int = 2):
    """The run finished at its last step, resumed from the newest committed checkpoint,
    lost no committed checkpoint, and its TensorBoard loss curve continues."""
    resume = facts["start_step"]
    assert facts["final_step"] == steps and facts["skipped_steps"] == 0
    assert 0 < resume < steps, f"no resume happened: start_step {resume}"
    # the newest committed checkpoint once the node was gone, and nothing committed was lost
    assert resume == max(facts["committed_after_kill"]) >= max(facts["committed_at_kill"])
    expected = list(range(every, steps + 1, every))
    assert facts["committed"] == expected and set(facts["committed_after_kill"]) <= set(expected)
    for step, meta in facts["meta"].items():
        step = int(step)
        assert meta["step"] == step and meta["ema_updates"] == step and meta["world_size"] == workers
        assert meta["samples_seen"] == step * batch * workers
    # TensorBoard: one event file per attempt; together they log every step exactly once
    # (the lost attempt's file holds the steps up to the resumed checkpoint, the next one
    # starts right after it), and the first loss after the resume continues the curve
    attempts = facts["tb"]
    assert len(attempts) >= 2, attempts
    logged = sorted(int(s) for a in attempts for s in a)
    assert logged == list(range(1, steps + 1)), logged
    resumed = next(a for a in attempts if min(int(s) for s in a) == resume + 1)
    before = {int(s): v for a in attempts for s, v in a.items() if int(s) <= resume}
    first_loss, last_before = resumed[str(resume + 1)], before[resume]
    # near the loss it had reached, well below where a fresh start would begin
    assert first_loss < 1.15 * last_before, (before, resumed)
    assert first_loss < before[1] - 0.25 * (before[1] - last_before), (before, resumed)


def test_fake_node_types_come_from_the_launcher_yaml():
    """The simulated fleet is cluster/aws.yaml's: same worker types and limits, min 0,
    GPUs as a custom resource with the instance's accelerator type, fewer CPUs."""
    import yaml

    from biflow.cluster import (
        SIM_GPU,
        default_template_dir,
        fake_autoscaling_config,
        fake_node_types,
    )

    real = yaml.safe_load((default_template_dir() / "aws.yaml").read_text())["available_node_types"]
    types = fake_node_types()
    assert set(types) == set(real) - {"head"}
    for name, t in types.items():
        res, spec = t["resources"], real[name]
        assert t["min_workers"] == 0 and t["max_workers"] == spec["max_workers"]
        assert t["priority"] == spec["priority"] and "GPU" not in res
        assert res[SIM_GPU] == spec["resources"]["GPU"] if "GPU" in spec["resources"] else SIM_GPU not in res
        assert res["CPU"] == max(1, spec["resources"]["CPU"] // 16)
    assert types["gpu-1x-a10g-spot"]["resources"]["accelerator_type:A10G"] == 1
    assert types["gpu-8x-a100-spot"]["resources"]["accelerator_type:A100"] == 1
    assert types["gpu-8x-h100-ondemand"]["resources"]["accelerator_type:H100"] == 1
    assert fake_node_types(max_workers=2, max_cpus=4)["gpu-8x-h100-ondemand"]["max_workers"] == 2
    config = fake_autoscaling_config(types, "10.0.0.1:40000")
    assert config["provider"]["type"] == "fake_multinode" and config["provider"]["gcs_address"] == "10.0.0.1:40000"
    assert config["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
    from ray.autoscaler._private.util import validate_config

    # what the autoscaler runs on it (prepare_config would merge Ray's fake_multi_node/example.yaml,
    # which the 2.60 wheel does not ship: ray.cluster_utils.AutoscalingCluster cannot start at all)
    validate_config(config)


@pytest.fixture(scope="module")
def fmnist_s3_shards(fashion_mnist_dir, s3_server, tmp_path_factory) -> str:
    """512 Fashion-MNIST training images as shards on the S3 server; returns their URI."""
    uri = f"s3://{s3_server.make_bucket('nodes-fmnist')}/fm"
    facts, _ = run_scenario("prepare", {"source": str(fashion_mnist_dir), "uri": uri, "endpoint": s3_server.endpoint},
                            tmp_path_factory.mktemp("prepare"), timeout=300)
    assert facts["records"] == 512
    return uri


def node_loss(name: str, shards: str, s3_server, tmp_path: Path, timeout: float = 900) -> dict[str, Any]:
    bucket = s3_server.make_bucket(f"nodes-{name.replace('_', '-')}")
    facts, _ = run_scenario(name, {"data_uri": shards, "endpoint": s3_server.endpoint, "bucket": bucket},
                            tmp_path, timeout=timeout)
    return facts


# make test-nodes (156-331 s on 2 cores). It ran in the default tier until the suite reached
# 39 min of CI's 40: a lost node's recovery path is Ray Train's restart of the worker group,
# which the default tier still covers with killed workers (test_faults_train.py).
@pytest.mark.slow
def test_forward_stage_loses_a_training_node_and_resumes(fmnist_s3_shards, s3_server, tmp_path):
    facts = node_loss("forward_node_loss", fmnist_s3_shards, s3_server, tmp_path)
    assert facts.get("forward"), "the forward stage did not get as far as the node loss"
    run = facts["forward"]
    print(json.dumps({k: run[k] for k in ("killed_node_actors", "committed_at_kill", "start_step", "wall_s",
                                          "kill_at_s", "dead_after_s")} | {"scenario_s": facts["scenario_seconds"]}))
    assert facts["head_cpus"] == 0 and facts["worker_nodes"] == 3
    assert run["train_nodes_before"] == 2, run["placement"]  # workers spread over two nodes
    assert "RayTrainWorker" in run["killed_node_actors"]
    assert_resumed_without_loss(run, steps=24, every=6)
    assert facts["replacements"][0]["removed"] == run["killed_node"]


@pytest.mark.slow  # make test-nodes
def test_reverse_stage_loses_the_ray_data_node_and_finishes(fmnist_s3_shards, s3_server, tmp_path):
    facts = node_loss("reverse_node_loss", fmnist_s3_shards, s3_server, tmp_path)
    assert facts.get("reverse"), "the reverse stage did not get as far as the node loss"
    run = facts["reverse"]
    print(json.dumps({k: run[k] for k in ("killed_node_actors", "killed_node_workers", "committed_at_kill",
                                          "start_step", "wall_s")}
                     | {"scenario_s": facts["scenario_seconds"]}))
    # the killed node was the data node: the only one with CPUs free for Ray Data, none for training
    assert run["killed_node"] == facts["data_node"] and "RayTrainWorker" not in run["killed_node_actors"]
    assert set(train_nodes(run["placement"])) == set(facts["trainer_nodes"])
    assert run["final_step"] == 24 and run["skipped_steps"] == 0
    assert run["committed"] == [6, 12, 18, 24]
    assert set(run["committed_at_kill"]) <= set(run["committed"])
    # the training workers lost only their input stream: either the stream recovered and the
    # run went on (one attempt), or the run restarted from the newest committed checkpoint
    if run["start_step"] == 0:
        assert len(run["tb"]) == 1 and sorted(int(s) for s in run["tb"][0]) == list(range(1, 25))
    else:
        assert_resumed_without_loss(run, steps=24, every=6)
    for meta in run["meta"].values():
        assert meta["stage"] == "reverse" and meta["samples_seen"] == meta["step"] * 64


@pytest.mark.slow  # make test-nodes
def test_tune_search_loses_a_node_and_the_trial_resumes(fmnist_s3_shards, s3_server, tmp_path):
    facts = node_loss("tune_node_loss", fmnist_s3_shards, s3_server, tmp_path)
    assert facts.get("tune"), "the search did not get as far as the node loss"
    info = facts["tune"]
    print(json.dumps({k: info[k] for k in ("killed_node_actors", "committed_at_kill", "wall_s", "kill_at_s")}
                     | {"scenario_s": facts["scenario_seconds"]}))
    assert "RayTrainWorker" in info["killed_node_actors"] and "TrainController" not in info["killed_node_actors"]
    rows = info["rows"]
    assert len(rows) == 2 and [r["status"] for r in rows] == ["completed", "completed"], rows
    assert all(int(r["step"]) == info["full_steps"] for r in rows)
    assert info["committed"] == list(range(info["every"], info["full_steps"] + 1, info["every"]))
    attempts = info["tb"]
    assert len(attempts) >= 2, attempts  # the interrupted trial's run restarted ...
    resume = min(int(s) for s in attempts[-1]) - 1
    assert resume >= max(info["committed_at_kill"])  # ... from its newest committed checkpoint
    assert sorted(int(s) for a in attempts for s in a) == list(range(1, info["full_steps"] + 1))


@pytest.fixture(scope="module")
def autoscaling(fmnist_s3_shards, s3_server, tmp_path_factory):
    bucket = s3_server.make_bucket("nodes-autoscaling")
    # token auth as a real fleet has it (ray start turns it on when ~/.ray/auth_token exists); a
    # private token for this cluster, passed to the head, its fake nodes and the driver
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    return run_scenario("autoscaling", {"data_uri": fmnist_s3_shards, "endpoint": s3_server.endpoint,
                                        "bucket": bucket}, tmp_path_factory.mktemp("autoscaling"), timeout=900,
                        env_extra=env)


@pytest.mark.slow  # 8-11 min on 2 cores: outside CI's budget; make test-nodes runs it
def test_autoscaling_from_zero_replaces_a_lost_node_and_scales_down(autoscaling):
    facts, _ = autoscaling
    assert facts.get("run"), "the job did not get as far as the node loss"
    run, timeline = facts["run"], facts["timeline"]
    print(json.dumps({k: facts.get(k) for k in ("launches", "scaled_down_at_s", "head_up_s")}, indent=1))
    print(json.dumps(timeline, indent=1))
    # the node types come from cluster/aws.yaml: GPUs simulated by a custom resource, min 0 workers
    a10g = facts["node_types"]["gpu-1x-a10g-spot"]
    assert a10g["sim_gpu"] == 1 and a10g["accelerator_type:A10G"] == 1 and "GPU" not in a10g
    assert facts["worker_nodes_at_start"] == 0
    joins = [e for e in timeline if e["event"] == "join"]
    gpu_joins = [e for e in joins if e["resources"].get("sim_gpu")]
    # scaled up from 0 for the 2 workers of {sim_gpu: 1} on A10G, plus the replacement of the lost one
    assert len([e for e in gpu_joins if e["t"] < run["submit_at_s"] + run["kill_at_s"]]) >= 2, timeline
    assert all(e["resources"].get("accelerator_type:A10G") for e in gpu_joins)
    assert any("gpu-1x-a10g-spot" in line for line in facts["launches"]), facts["launches"]
    killed_left = [e for e in timeline if e["event"] == "leave" and e["node"] == run["killed_node"]]
    assert killed_left, timeline
    replaced = [e for e in gpu_joins if e["t"] > killed_left[0]["t"] - 10 and e["node"] != run["killed_node"]
                and e["t"] > run["submit_at_s"] + run["kill_at_s"]]
    assert replaced, timeline
    assert_resumed_without_loss(run, steps=16, every=4)
    # idle nodes scale back down to the head alone
    assert facts["scaled_down_at_s"] is not None, timeline
    assert len([e for e in timeline if e["event"] == "leave"]) == len(joins)


@pytest.mark.slow  # make test-nodes
def test_preemptions_resume_from_just_in_time_checkpoints(fmnist_s3_shards, s3_server, tmp_path):
    """A run with max_failures=0 survives 3 spot reclaims: each drained node's workers commit a
    checkpoint before the deadline, the run resumes from it, and no step taken before the notice
    is lost."""
    bucket = s3_server.make_bucket("nodes-preempt")
    facts, _ = run_scenario("preemption", {"data_uri": fmnist_s3_shards, "endpoint": s3_server.endpoint,
                                           "bucket": bucket}, tmp_path, timeout=1200,
                            env_extra={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})
    events, attempts = facts["preemptions"], facts["attempts"]
    print(json.dumps({"preemptions": events, "attempts": [[a[0], a[-1]] for a in attempts],
                      "committed": facts["committed"], "run_wall_s": facts["run_wall_s"],
                      "scenario_seconds": facts["scenario_seconds"]}, indent=1))
    assert facts["max_failures"] == 0 and facts["final_step"] == 200 and len(events) == 3
    assert len(attempts) == 4, attempts  # one attempt per preemption, plus the first
    jit_steps = []
    for event, resumed in zip(events, attempts[1:]):
        assert "RayTrainWorker" in event["actors"]
        (jit,) = event["jit_checkpoint"]
        assert jit >= event["step_at_notice"]  # no step taken before the notice is lost
        assert event["jit_after_notice_s"] < event["drain_deadline_in_s"]  # committed before the deadline
        assert resumed[0] == jit + 1  # resumed from the just-in-time checkpoint
        jit_steps.append(jit)
    assert facts["committed"] == [*jit_steps, 200]
    kept = [s for a, nxt in zip(attempts, [*[b[0] for b in attempts[1:]], 201]) for s in a if s < nxt]
    assert kept == list(range(1, 201))  # every step once in the run's history


if __name__ == "__main__":
    main(sys.argv[1:])
