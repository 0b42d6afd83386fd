"""`medsearch serve` under a process supervisor: SIGTERM (docker stop, Kubernetes) and SIGINT end
with a graceful shutdown, the store closed and exit code 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The child serves a stand-in state (no models, no store) and marks its close() in a file: what is
# under test is the process's shutdown path, not the search stack.
CHILD = """
import sys
from pathlib import Path
import service.server as server
from settings import Settings

marker = Path(sys.argv[1])

class StandIn:
    encoder = None  # never called: no request is made

    def warm_up(self):
        marker.write_text("started")
    def close(self):
        marker.write_text("closed")

server.load_state = lambda settings: StandIn()
sys.exit(server.serve(Settings(port=0)))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_shuts_down_gracefully_closing_the_store(tmp_path: Path, sig: signal.Signals) -> None:
    marker = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not (marker.is_file() and marker.read_text() == "started"):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert code == 0  # before the fix: -15 (killed by the re-raised SIGTERM) and the store left open
    assert marker.read_text() == "closed"
