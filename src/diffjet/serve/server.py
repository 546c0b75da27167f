"""Running the app in this process with uvicorn: the socket, readiness on stdout, SIGTERM, a failed start."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from typing import Any

from ..errors import ConfigError, DiffjetError
from .settings import ServeSettings


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port before any model loads, so a port in use is one line at once;
    port 0 takes a free one (`sock.getsockname()` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app: Any, access_log: bool = False) -> Any:
    """A uvicorn server for `app` (from `build_app`) that, once told to stop, stops waiting for batches to
    fill: the requests in flight, which it waits for, are answered at once."""
    import uvicorn

    service = app.state.service

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            service.batcher.close()
            await super().shutdown(sockets)

    # Graceful shutdown waits for every request in flight; each is bounded by --timeout.
    return Server(uvicorn.Config(app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=None,
                                 lifespan="on"))


def run(settings: ServeSettings, sock: socket.socket, access_log: bool = False) -> None:
    """Serve until SIGTERM or SIGINT; then finish the accepted requests and return.

    Prints the address at once and `ready` once every served shape is warm. Raises `DiffjetError` when
    the pipeline cannot be loaded or warmed (the server stops then)."""
    from .app import build_app

    server: Any = None

    def stop(error: BaseException) -> None:
        server.should_exit = True  # noticed by uvicorn's main loop within a tenth of a second

    app = build_app(settings, on_failure=stop)
    server = make_server(app, access_log=access_log)
    worker = app.state.service.worker
    sizes = ", ".join(f"{w}x{h}" for w, h in settings.sizes)
    print(f"diffjet serve: {url(sock)} ({settings.model_name}; warming {sizes} at batch "
          f"{','.join(map(str, settings.warm_batches))}; "
          "GET /healthz says when ready)", flush=True)

    def announce() -> None:
        worker.ready.wait()
        print("diffjet serve: ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn re-raises the SIGTERM it shut down on, once done; by then it is a normal end (exit code 0).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if worker.failure is not None:
        failure = worker.failure
        if isinstance(failure, DiffjetError):
            raise failure
        first_line = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise DiffjetError(f"the pipeline could not be loaded or warmed: {first_line} (-v shows the whole error)") from failure
    print("diffjet serve: stopped", file=sys.stderr, flush=True)
