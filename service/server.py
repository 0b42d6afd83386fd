"""Run the service under uvicorn; the process exit code is ``serve``'s return value."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from service.access_log import JsonFormatter
from service.app import create_app
from service.state import StartupError, load_state
from settings import Settings

EXIT_STARTUP_ERROR = 2


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGTERM/SIGINT after its graceful shutdown: re-raised, the
    signal's default action kills the process (exit 143) before ``serve`` closes the store."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # Emptied before uvicorn's context manager walks the list to re-raise each signal.
                self._captured_signals.clear()


def serve(settings: Settings) -> int:
    """Serve until interrupted: 0 after a clean shutdown, 2 when the configuration cannot be served
    (message on stderr), uvicorn's code when it fails to start (e.g. the port is taken)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # Loaded before uvicorn starts so a bad setup is one clear line, not a lifespan traceback.
    try:
        state = load_state(settings)
    except StartupError as exc:
        print(f"medsearch: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP_ERROR
    try:
        app = create_app(settings, state)
    except StartupError as exc:  # e.g. an unreadable API key file
        state.close()
        print(f"medsearch: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP_ERROR
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        workers=1,
        # Our access log (JSON, route templates, request ids) replaces uvicorn's, which prints the raw
        # path with its query string; its own config would also replace our JSON handlers.
        access_log=False,
        log_config=None,
    )
    try:
        _Server(config).run()
    except SystemExit as exc:
        # uvicorn exits the process on start-up failures; hand the code to the caller instead.
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        state.close()
    return 0
