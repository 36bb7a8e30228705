"""biflow.fleet: GPUs from zero, spot to on-demand fallback, and the spot notice.

- The scorer is driven through Ray's own v1 scheduler (``get_nodes_for``) and
  availability tracker with the node types of cluster/aws.yaml, before and
  after a recorded launch failure.
- ``use_gpu: auto`` is decided on a real local Ray with no GPU up, from the
  launcher config file and from the cluster config published into the GCS.
- The notice watcher polls stand-ins of EC2's IMDSv2 and GCE's metadata server
  served on loopback (the real ones exist only on their clouds); a GCE notice
  drains a node of a real two-node Ray cluster here, and the preemption
  scenario of tests/test_nodes.py follows AWS notices through training.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from biflow.config import ConfigError, ExperimentConfig
from biflow.fleet import capacity, scorer, spot_notice
from tests.imds import FakeGCE, FakeIMDS, notice_in

pytestmark = pytest.mark.integration

AWS_YAML = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


def aws_config() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


# ---------------------------------------------------------------------------
# Spot fallback through Ray's scheduler
# ---------------------------------------------------------------------------


def choose(node_types: dict, demand: list[dict], tracker, scorer_fn) -> dict[str, int]:
    from functools import partial

    from ray.autoscaler._private.resource_demand_scheduler import get_nodes_for

    chosen, _ = get_nodes_for(node_types, {}, "head", 10, demand,
                              partial(scorer_fn, node_availability_summary=tracker.summary()))
    return dict(chosen)


def insufficient_capacity(tracker, node_type: str, clock: list[float]) -> None:
    from ray.autoscaler.node_launch_exception import NodeLaunchException

    tracker.update_node_availability(node_type, int(clock[0]), NodeLaunchException(
        "InsufficientInstanceCapacity", f"no spot capacity for {node_type}", None))


@pytest.mark.parametrize("demand,spot,ondemand", [
    ([{"CPU": 8, "GPU": 1}], "gpu-1x-a10g-spot", "gpu-1x-a10g-ondemand"),
    ([{"CPU": 96, "GPU": 8}], "gpu-8x-a100-spot", "gpu-8x-a100-ondemand"),
])
def test_spot_fallback_after_a_failed_launch(demand, spot, ondemand):
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer

    types = aws_config()["available_node_types"]
    clock = [1_000.0]
    tracker = NodeProviderAvailabilityTracker(timer=lambda: clock[0], ttl=1800)
    before = choose(types, demand, tracker, scorer.spot_fallback_scorer)
    insufficient_capacity(tracker, spot, clock)
    after = choose(types, demand, tracker, scorer.spot_fallback_scorer)
    default_after = choose(types, demand, tracker, _default_utilization_scorer)
    clock[0] += 1801  # the record goes stale: spot is tried again
    stale = choose(types, demand, tracker, scorer.spot_fallback_scorer)
    print(f"{demand}: before {before}, after the failure {after} (Ray's default scorer: {default_after}), "
          f"30 min later {stale}")
    assert before == {spot: 1}
    assert after == {ondemand: 1}
    assert default_after == {spot: 1}  # the bug this scorer fixes
    assert stale == {spot: 1}


def test_the_autoscaler_loads_the_scorer_by_name(monkeypatch):
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    monkeypatch.setenv("RAY_AUTOSCALER_UTILIZATION_SCORER", "biflow.fleet.scorer.spot_fallback_scorer")
    sched = ResourceDemandScheduler(provider=None, node_types=aws_config()["available_node_types"],
                                    max_workers=24, head_node_type="head", upscaling_speed=1.0)
    assert sched.utilization_scorer is scorer.spot_fallback_scorer


# ---------------------------------------------------------------------------
# GPUs from zero
# ---------------------------------------------------------------------------


def test_node_type_maxima_of_the_launcher_config():
    maxima = capacity.node_type_maxima(aws_config())
    # a10g: 8 spot + 4 on-demand x 1 GPU; a100: (4 + 4) x 8; h100: 2 x 8
    assert maxima["GPU"] == 12 + 64 + 16
    assert maxima["CPU"] == 8 * 32 + 12 * 8 + 8 * 96 + 2 * 192  # the head has CPU: 0


def gpu_config(use_gpu: str) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.ray.use_gpu = use_gpu
    return cfg


def test_use_gpu_auto_from_the_launcher_config_with_no_gpu_up(ray_local, tmp_path, monkeypatch):
    from biflow.train.launch import _use_gpu

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    monkeypatch.setenv(capacity.CONFIG_ENV, str(tmp_path / "none.yaml"))
    assert _use_gpu(gpu_config("auto")) is False  # no autoscaler config: what is up (no GPU)
    monkeypatch.setenv(capacity.CONFIG_ENV, str(AWS_YAML))
    assert _use_gpu(gpu_config("auto")) is True  # GPU node types at min_workers 0
    cpu_only = aws_config()
    cpu_only["available_node_types"] = {k: v for k, v in cpu_only["available_node_types"].items()
                                        if "GPU" not in v.get("resources", {})}
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu_only))
    monkeypatch.setenv(capacity.CONFIG_ENV, str(tmp_path / "cpu.yaml"))
    assert _use_gpu(gpu_config("auto")) is False
    with pytest.raises(ConfigError, match="ray.use_gpu=yes, but no node type of this cluster's autoscaler has a GPU"):
        _use_gpu(gpu_config("yes"))


def test_use_gpu_auto_from_the_cluster_config_in_the_gcs(ray_local, tmp_path, monkeypatch):
    """What the launcher's head publishes at start; Ray Train reads the same config."""
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    from biflow.train.launch import _use_gpu
    from biflow.tune.driver import _concurrency
    from biflow.tune.spec import SearchSpec

    monkeypatch.setenv(capacity.CONFIG_ENV, str(tmp_path / "none.yaml"))
    gcs = ray_local._private.worker.global_worker.gcs_client
    try:
        published = capacity.publish(AWS_YAML)
        assert state.get_max_resources_from_cluster_config()["GPU"] == published["GPU"] == 92
        assert _use_gpu(gpu_config("auto")) is True
        cfg = gpu_config("yes")
        cfg.ray.workers, cfg.ray.cpus_per_worker = 8, 8
        spec = SearchSpec(num_samples=20)
        assert _concurrency(spec, cfg) == 92 // 8  # sized by what the fleet can have, not what is up (0 GPUs)
    finally:  # the session's Ray is shared: leave it without a cluster config
        gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    assert state.get_max_resources_from_cluster_config() is None
    assert _use_gpu(gpu_config("auto")) is False


# ---------------------------------------------------------------------------
# The spot notice watcher
# ---------------------------------------------------------------------------


@pytest.fixture
def imds():
    from tests.imds import serve

    server, url = serve()
    yield server, url
    server.shutdown()


def test_watch_exits_on_an_on_demand_instance(imds):
    _, url = imds
    FakeIMDS.lifecycle = "on-demand"
    assert spot_notice.watch(spot_notice.Metadata(url), node_id="x", poll_s=0.01, max_polls=3) is None


def test_watch_reads_the_notice_deadline(imds):
    _, url = imds
    meta = spot_notice.Metadata(url)
    assert meta.is_spot() and meta.interruption_deadline() is None
    FakeIMDS.notice = notice_in(120)
    assert meta.interruption_deadline() == pytest.approx(time.time() + 120, abs=2)


@pytest.fixture
def gce():
    from tests.imds import serve

    server, url = serve(FakeGCE)
    yield server, url
    server.shutdown()


def test_gce_metadata_gives_thirty_seconds_from_the_first_preempted_read(gce):
    _, url = gce
    meta = spot_notice.metadata_for("gcp", url)
    assert meta.is_spot() and meta.interruption_deadline() is None
    FakeGCE.model = "STANDARD"
    assert not meta.is_spot()
    assert spot_notice.watch(meta, node_id="x", poll_s=0.01, max_polls=3) is None  # on-demand: exits
    FakeGCE.preempted = True
    first = meta.interruption_deadline()
    assert first == pytest.approx(time.time() + 30, abs=1)
    time.sleep(0.2)
    assert meta.interruption_deadline() == first  # counted from the first poll that saw it
    # the server refuses a request without its header, as GCE does
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{url}/computeMetadata/v1/instance/preempted", timeout=2)
    with pytest.raises(ValueError, match="unknown cloud 'azure'"):
        spot_notice.metadata_for("azure")


DRAIN_ON_GCE_NOTICE = """
import json, threading, time
import ray
from ray.cluster_utils import Cluster
from biflow.fleet import spot_notice
from tests.imds import FakeGCE, serve

server, url = serve(FakeGCE)
cluster = Cluster()
cluster.add_node(num_cpus=0, include_dashboard=False)
node = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
# a busy node (as one running a training worker), else a drained node shuts down at once
busy = ray.remote(num_cpus=1)(type("Busy", (), {"ping": lambda self: 1})).remote()
assert ray.get(busy.ping.remote()) == 1
threading.Timer(1.0, lambda: setattr(FakeGCE, "preempted", True)).start()
t0 = time.time()
deadline = spot_notice.main(["--node-id", node.node_id, "watch", "--cloud", "gcp", "--metadata-url", url,
                             "--margin-s", "5"])
draining = ray._private.state.state.get_draining_nodes()
print(json.dumps({"rc": deadline, "after_s": time.time() - t0, "now": time.time(),
                  "draining": {k: v / 1000 for k, v in draining.items()}, "node": node.node_id}))
ray.shutdown()
cluster.shutdown()
"""


def test_gce_notice_drains_the_node_as_preempted():
    """The watcher's command line on a GCE spot VM, against a real two-node Ray cluster (its own
    process: the session's local Ray is not to be drained): the node is draining, with the
    notice time less the margin as deadline."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    ray_tmp = tempfile.mkdtemp(prefix="bfg-")  # short: Ray's socket paths must fit in 107 bytes
    try:
        proc = subprocess.run([sys.executable, "-c", DRAIN_ON_GCE_NOTICE], cwd=root, capture_output=True,
                              text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(root),
                                                           "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0 and out["after_s"] < 10  # polled every second: seen about a second after the notice
    assert list(out["draining"]) == [out["node"]]
    # GCE stops the VM 30 s after the notice; Ray was told 25 s (the 5 s margin), counted from the poll
    assert out["draining"][out["node"]] - out["now"] == pytest.approx(25, abs=3)
