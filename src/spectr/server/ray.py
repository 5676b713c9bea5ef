"""`spectr serve --replicas N`: the same app on N replicas behind Ray Serve's router (an optional extra:
`pip install 'spectr[ray]'`).

Each replica is its own process with its own engine, built by `create_app` when the replica starts; Ray
Serve's proxy spreads requests over them and holds back those beyond `max_ongoing_requests` per replica
(backpressure), and scales between `min_replicas` and `max_replicas` with autoscaling on. Every response
says which replica served it (`x-spectr-replica`), and each replica's /metrics is its own.
"""

import os
from collections.abc import Callable

from spectr.errors import UnsupportedModelError
from spectr.server.app import ServerSettings, create_app

REPLICA_HEADER = "x-spectr-replica"


def replica_app(load_engine: Callable, settings: ServerSettings):
    """The app of one replica, loaded before Ray Serve routes to it, its responses marked with its id."""
    app = create_app(load_engine, settings, preload=True)
    replica = f"{os.uname().nodename}-{os.getpid()}"

    @app.middleware("http")
    async def mark(request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return app


def application(load_engine: Callable, settings: ServerSettings, replicas: int = 2, autoscale_to: int | None = None):
    """A Ray Serve application of `replicas` spectr replicas (autoscaling up to `autoscale_to` if given)."""
    try:
        from ray import serve
    except ImportError:
        raise UnsupportedModelError("replicas run on Ray Serve: pip install 'spectr[ray]'") from None
    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": autoscale_to,
                                       "target_ongoing_requests": settings.max_concurrency}}
               if autoscale_to else {"num_replicas": replicas})
    ingress = serve.ingress(lambda: replica_app(load_engine, settings))()
    deployment = serve.deployment(ingress, name="spectr", max_ongoing_requests=settings.max_concurrency + settings.max_queue,
                                  ray_actor_options={"num_cpus": 0}, **scaling)
    return deployment.bind()


def run(load_engine: Callable, settings: ServerSettings, host: str, port: int, replicas: int,
        autoscale_to: int | None = None, blocking: bool = True) -> None:
    """Start Ray (locally, or join RAY_ADDRESS), Serve's proxy on host:port, and the replicas."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(load_engine, settings, replicas, autoscale_to), name="spectr", route_prefix="/",
              blocking=blocking)
