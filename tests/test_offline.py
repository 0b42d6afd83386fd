"""The offline guard (pytest-socket, configured in pyproject.toml's addopts): a test may connect to
loopback and Unix sockets only; anything else fails the test. Only the real dependency audit is
exempt (tests/test_audit.py, marked enable_socket)."""

from __future__ import annotations

import inspect
import re
import socket
import threading
from pathlib import Path

import httpx
import pytest
from pytest_socket import SocketConnectBlockedError

from tests import test_audit


@pytest.mark.parametrize("address", [("192.0.2.1", 443), ("2001:db8::1", 443)], ids=["ipv4", "ipv6"])
def test_a_connection_beyond_loopback_fails_the_test(address: tuple[str, int]) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(SocketConnectBlockedError):
        sock.connect(address)


def test_http_clients_are_guarded_too() -> None:
    with pytest.raises(SocketConnectBlockedError):
        httpx.get("http://192.0.2.1/", timeout=1)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_stays_open(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen(1)
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(server.getsockname()[:2], timeout=5):
            pass
        accepted.join(timeout=5)


def test_the_audit_is_the_only_test_allowed_out() -> None:
    exempt = {
        path.name
        for path in Path(__file__).parent.glob("*.py")
        if path.name != Path(__file__).name
        and re.search(r"enable_socket|socket_enabled|force-enable-socket", path.read_text(encoding="utf-8"))
    }
    assert exempt == {"test_audit.py"}
    assert "enable_socket" in inspect.getsource(test_audit.test_the_lock_passes_the_audit_against_pypi)
    assert "--allow-hosts=127.0.0.0/8,::1" in (Path(__file__).parents[1] / "pyproject.toml").read_text()
