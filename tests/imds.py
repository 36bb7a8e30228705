"""The EC2 instance metadata service (IMDSv2) and the GCE metadata server, as much
of them as the spot notice watcher reads, served on loopback: the real ones exist
only on their clouds' machines."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeIMDS(BaseHTTPRequestHandler):
    """IMDSv2 as EC2 serves it: a PUT for a token, GETs that need it, 404 when no notice."""

    lifecycle = "spot"
    notice: dict | None = None
    token = "tok-123"

    def do_PUT(self):  # noqa: N802 (http.server's naming)
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self._send(400, "")
        self._send(200, self.token)

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401, "")
        if self.path == "/latest/meta-data/instance-life-cycle":
            return self._send(200, type(self).lifecycle)
        if self.path == "/latest/meta-data/spot/instance-action" and type(self).notice:
            return self._send(200, json.dumps(type(self).notice))
        self._send(404, "Not Found")

    def _send(self, code: int, body: str):
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


class FakeGCE(FakeIMDS):
    """GCE's metadata server: every request needs ``Metadata-Flavor: Google`` (403
    without); ``preempted`` reads FALSE until the VM is preempted."""

    model = "SPOT"  # scheduling/provisioning-model: SPOT or STANDARD
    preempted = False

    def do_GET(self):  # noqa: N802
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._send(403, "Missing Metadata-Flavor:Google header.")
        answers = {"scheduling/provisioning-model": type(self).model, "scheduling/preemptible": "FALSE",
                   "preempted": "TRUE" if type(self).preempted else "FALSE"}
        path = self.path.removeprefix("/computeMetadata/v1/instance/")
        if path in answers:
            return self._send(200, answers[path])
        self._send(404, "Not Found")


def serve(handler: type[FakeIMDS] = FakeIMDS) -> tuple[ThreadingHTTPServer, str]:
    """Serve it on a free loopback port (a spot instance with no notice); returns (server, base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeIMDS.lifecycle, FakeIMDS.notice = "spot", None
    FakeGCE.model, FakeGCE.preempted = "SPOT", False
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def notice_in(seconds: float) -> dict:
    return {"action": "terminate", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))}
