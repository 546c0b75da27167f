"""`diffjet serve --ray`: the same HTTP app on Ray Serve, one replica per GPU.

Each replica is a Ray actor that builds the app of `app.py` (its own batcher, worker thread and
metrics) and holds one GPU; Ray Serve's proxy takes the HTTP requests and routes each to a replica
with room, so batching stays diffjet's, per replica. A replica's start-up returns once its pipeline is
warm (`build_app(..., wait_until_warm=True)`), so Ray routes nothing to a cold one, and an autoscaled
replica joins only when warm. Ray Serve's graceful shutdown lets replicas finish the requests they hold,
and the app's own shutdown finishes every accepted image, as with uvicorn.

As a library, for a cluster of one's own:

    from ray import serve
    from diffjet.serve import ServeSettings
    from diffjet.serve.ray import application

    serve.run(application(ServeSettings(model="sd15", sizes=((512, 512),), device="cuda"), replicas=2))

Everything a replica reads (the model folder, `--lora-dir`) must be at the same path on every node.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from .settings import ServeSettings


class DiffjetReplica:
    """One replica: its app is built on the replica, after Ray has given it its GPU."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        from .app import build_app

        return build_app(self.settings, wait_until_warm=True)


def application(settings: ServeSettings, *, replicas: int = 1, min_replicas: int | None = None,
                max_replicas: int | None = None, gpus_per_replica: float = 1.0) -> Any:
    """The Ray Serve application: `replicas` fixed, or autoscaled between `min_replicas` and `max_replicas`
    on the images each replica holds (a replica is busy at `max_batch` requests in flight)."""
    from ray import serve

    options: dict[str, Any] = {
        "name": "diffjet",
        # A replica with no GPU is a CPU replica (tests); it still takes one CPU, so replicas do not crowd.
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": 0 if gpus_per_replica else 1},
        # The replica's own queue answers 429 beyond --queue; Ray never holds more than it can queue.
        "max_ongoing_requests": settings.queue + settings.max_batch,
        # A replica being stopped answers what it holds first; each request is bounded by --timeout.
        "graceful_shutdown_timeout_s": settings.timeout_s,
    }
    if min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(**options)(serve.ingress()(DiffjetReplica))
    return deployment.bind(settings)


def run(settings: ServeSettings, host: str, port: int, **scaling: Any) -> None:
    """Start Ray (here, or join the cluster `RAY_ADDRESS` names), serve on host:port until SIGTERM or
    SIGINT, then shut Serve down gracefully."""
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"diffjet serve: starting on Ray Serve at http://{host}:{port} ({settings.model_name}); "
              "each replica is routed to once warm", flush=True)
        serve.run(application(settings, **scaling), name="diffjet", route_prefix="/")
        print("diffjet serve: ready", flush=True)
        _wait_for_a_stop_signal()
        serve.shutdown()
    finally:
        ray.shutdown()
    print("diffjet serve: stopped", flush=True)


def _wait_for_a_stop_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
