"""Turn a spot interruption notice into a Ray drain with the preemption reason.

AWS gives a spot instance two minutes' notice: the instance metadata service
(IMDSv2) answers ``/latest/meta-data/spot/instance-action`` with
``{"action": "terminate", "time": "...Z"}`` instead of 404. GCE gives a spot
(or preemptible) VM 30 seconds: its metadata server's ``instance/preempted``
turns from ``FALSE`` to ``TRUE``. This module polls the one of its cloud
and drains the node's raylet with ``DRAIN_NODE_REASON_PREEMPTION`` and the
deadline, what ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
--deadline-remaining-seconds N`` does. Ray then

- schedules nothing new on the node,
- tells Ray Train, whose ``ray.train.get_preemption_info()`` the training loop
  checks: every rank writes a just-in-time checkpoint before the deadline,
- marks the workers' death as a preemption, so the restart counts against
  ``FailureConfig.max_preemption_failures`` (unlimited), not ``max_failures``.

Two commands::

    python -m biflow.fleet.spot_notice watch      # launcher workers (AWS): poll IMDS, drain on notice
    python -m biflow.fleet.spot_notice watch --cloud gcp --margin-s 5   # launcher workers (GCP)
    python -m biflow.fleet.spot_notice drain --deadline-s 110 --wait   # KubeRay preStop hook

``watch`` exits at once on an on-demand instance. ``drain`` is for Kubernetes,
where Karpenter reads the interruption queue and evicts the pod; the preStop hook
drains the node and keeps the pod alive until the deadline, so the workers can
commit their checkpoint before Ray is stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

IMDS = "http://169.254.169.254"
GCE_METADATA = "http://metadata.google.internal"
TOKEN_TTL_S = 21600
POLL_S = {"aws": 5.0, "gcp": 1.0}  # GCE's notice is 30 s: poll it closely
DEFAULT_DEADLINE_S = 110.0  # AWS's notice is 120 s; leave Ray time to stop


def _log(msg: str) -> None:
    print(f"[spot-notice {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _read(req: urllib.request.Request, timeout: float) -> str | None:
    """A metadata server's answer as text; None for a path it does not have (404)."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


class Metadata:
    """An IMDSv2 session (a token, renewed when it expires)."""

    def __init__(self, base: str = IMDS, timeout: float = 2.0):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self._token = ""
        self._token_at = 0.0

    def _token_now(self) -> str:
        if not self._token or time.time() - self._token_at > TOKEN_TTL_S / 2:
            req = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                self._token = resp.read().decode()
            self._token_at = time.time()
        return self._token

    def get(self, path: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``, or None when it does not exist (404)."""
        req = urllib.request.Request(f"{self.base}/latest/meta-data/{path}",
                                     headers={"X-aws-ec2-metadata-token": self._token_now()})
        try:
            return _read(req, self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # token expired or revoked: fetch a new one next time
                self._token = ""
            raise

    def is_spot(self) -> bool:
        return (self.get("instance-life-cycle") or "").strip() == "spot"

    def interruption_deadline(self) -> float | None:
        """Unix time of a pending spot stop/terminate/hibernate, or None."""
        text = self.get("spot/instance-action")
        if not text:
            return None
        notice = json.loads(text)
        when = datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        return when.timestamp()


class GceMetadata:
    """The GCE metadata server, as much as a spot VM's preemption needs. It has no
    notice time: a preempted VM gets ``NOTICE_S`` from the moment ``preempted``
    reads ``TRUE``, so the deadline counts from the first poll that saw it."""

    NOTICE_S = 30.0

    def __init__(self, base: str = GCE_METADATA, timeout: float = 2.0):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self._seen_at: float | None = None

    def get(self, path: str) -> str | None:
        """The text at ``/computeMetadata/v1/instance/<path>``, or None when it does not exist."""
        return _read(urllib.request.Request(f"{self.base}/computeMetadata/v1/instance/{path}",
                                            headers={"Metadata-Flavor": "Google"}), self.timeout)

    def is_spot(self) -> bool:
        model = (self.get("scheduling/provisioning-model") or "").strip().upper()
        return model == "SPOT" or (self.get("scheduling/preemptible") or "").strip().upper() == "TRUE"

    def interruption_deadline(self) -> float | None:
        """Unix time the VM stops (30 s after the preemption was first seen), or None."""
        if (self.get("preempted") or "").strip().upper() != "TRUE":
            return None
        if self._seen_at is None:
            self._seen_at = time.time()
        return self._seen_at + self.NOTICE_S


def metadata_for(cloud: str, url: str = "") -> Metadata | GceMetadata:
    """The metadata client of ``cloud`` (aws or gcp), at ``url`` or the cloud's own address."""
    if cloud == "aws":
        return Metadata(url or IMDS)
    if cloud == "gcp":
        return GceMetadata(url or GCE_METADATA)
    raise ValueError(f"unknown cloud {cloud!r}: expected aws or gcp")


def drain(node_id: str, deadline_s: float, message: str) -> None:
    """Drain a Ray node (Ray initialised) as preempted, ``deadline_s`` from now."""
    import ray
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int((time.time() + max(deadline_s, 0.0)) * 1000)
    accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def _connect(address: str) -> str:
    """Connect to Ray; the id of the node this process runs on."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray.get_runtime_context().get_node_id()


def watch(meta: Metadata | GceMetadata, address: str = "auto", node_id: str = "",
          poll_s: float = POLL_S["aws"], margin_s: float = 10.0, max_polls: int = 0) -> float | None:
    """Poll for a notice; on one, drain the node with the deadline less ``margin_s``
    (time for Ray to stop). Returns the deadline drained with, or None when the
    instance is on-demand (or ``max_polls`` passed without a notice)."""
    if not meta.is_spot():
        _log("on-demand instance: nothing to watch")
        return None
    polls = 0
    while not max_polls or polls < max_polls:
        polls += 1
        try:
            deadline = meta.interruption_deadline()
        except (OSError, ValueError, KeyError) as exc:  # IMDS hiccup or an odd answer: try again
            _log(f"metadata poll failed: {exc}")
            deadline = None
        if deadline is not None:
            remaining = deadline - time.time() - margin_s
            node_id = node_id or _connect(address)
            drain(node_id, remaining, f"spot interruption notice: instance stops at {time.ctime(deadline)}")
            _log(f"notice: drained node {node_id[:12]} with {remaining:.0f} s to its deadline")
            return deadline
        time.sleep(poll_s)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biflow.fleet.spot_notice", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="Ray address (default: the node's cluster)")
    parser.add_argument("--node-id", default="", help="the Ray node to drain (default: this machine's)")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="poll the instance metadata for a spot notice and drain this node on one")
    w.add_argument("--cloud", choices=["aws", "gcp"], default="aws", help="whose metadata server (default: aws)")
    w.add_argument("--metadata-url", "--imds", default="",
                   help=f"metadata endpoint (default: {IMDS} on aws, {GCE_METADATA} on gcp)")
    w.add_argument("--poll-s", type=float, default=0.0, help="seconds between polls (default: 5 aws, 1 gcp)")
    w.add_argument("--margin-s", type=float, default=10.0, help="drain deadline = notice time minus this")
    d = sub.add_parser("drain", help="drain this node now as preempted (a preStop hook)")
    d.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S)
    d.add_argument("--wait", action="store_true", help="then wait until the deadline (keeps the pod alive)")
    args = parser.parse_args(argv)
    try:
        if args.command == "watch":
            watch(metadata_for(args.cloud, args.metadata_url), args.address, args.node_id,
                  args.poll_s or POLL_S[args.cloud], args.margin_s)
            return 0
        node_id = args.node_id or _connect(args.address)
        if args.node_id:  # another node of this cluster: connect all the same
            _connect(args.address)
        drain(node_id, args.deadline_s, "pod terminating (preStop)")
        _log(f"drained node {node_id[:12]}, deadline in {args.deadline_s:.0f} s")
        if args.wait:
            time.sleep(max(args.deadline_s, 0.0))
    except (OSError, RuntimeError, ConnectionError) as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
