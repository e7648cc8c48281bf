"""`ray_app(config, num_replicas=N)`: the Ray Serve application (N engine replicas, one
board, one ingress), and `loraserve serve-ray`, which runs it.

    serve.run(loraserve.api.ray_app(EngineConfig(max_loras=8), num_replicas=4))

Every replica reads the same adapter store (`config.adapter_dir`: a directory all nodes
see, e.g. a shared filesystem); the ingress is its one writer, so it runs one replica.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from ray import serve

from loraserve.config import EngineConfig

from .ray_ingress import IngressCore, ingress_builder
from .ray_replica import EngineReplica, ReplicaBoard
from .settings import ServerSettings

log = logging.getLogger("loraserve.ray")

APP_NAME = "loraserve"
ENGINE_DEPLOYMENT = "LoraEngine"
BOARD_DEPLOYMENT = "LoraReplicaBoard"
INGRESS_DEPLOYMENT = "LoraIngress"
QUIET = {"enable_access_log": False}   # no log line per request (and per replica report)
INGRESS_MAX_ONGOING = 4096   # the ingress only forwards: its limit is the admission queue, not Ray's


class _Ingress:
    """Takes the engine and board deployments as arguments so they are part of the app;
    the routes reach them through handles made in the builder (serve.ingress calls it
    without arguments)."""

    def __init__(self, engine, board):
        pass


def ray_app(config: EngineConfig | None = None, num_replicas: int = 1, settings: ServerSettings | None = None,
            max_adapters_per_replica: int | None = None, ray_actor_options: dict | None = None,
            adapter_affinity: bool = True):
    """The bound Serve application. `max_adapters_per_replica` is how many adapter versions
    Ray Serve's multiplexing counts as held by one replica (default: its device slots,
    `max_loras`); `ray_actor_options` are the engine replicas' (default: 1 CPU each; on
    GPUs pass {"num_gpus": 1}). `adapter_affinity=False` leaves routing to Ray Serve's
    default (python -m benchmarks.ray_scaling compares the two)."""
    config = config or EngineConfig()
    settings = settings or ServerSettings()
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    max_adapters = max_adapters_per_replica or config.max_loras
    board = serve.deployment(ReplicaBoard, name=BOARD_DEPLOYMENT, num_replicas=1, logging_config=QUIET,
                             ray_actor_options={"num_cpus": 0}).bind()
    engine = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT, num_replicas=num_replicas, logging_config=QUIET,
                              # a replica batches up to max_num_seqs requests; past that Ray routes elsewhere
                              max_ongoing_requests=config.max_num_seqs,
                              ray_actor_options=ray_actor_options or {"num_cpus": 1},
                              ).bind(config, max_adapters, board)
    ingress_class = serve.ingress(ingress_builder(config, settings, num_replicas, ENGINE_DEPLOYMENT,
                                                  BOARD_DEPLOYMENT, adapter_affinity))(_Ingress)
    return serve.deployment(ingress_class, name=INGRESS_DEPLOYMENT, num_replicas=1, logging_config=QUIET,
                            max_ongoing_requests=INGRESS_MAX_ONGOING,
                            ray_actor_options={"num_cpus": 0}).bind(engine, board)


def run_serve_ray(args: argparse.Namespace, config: EngineConfig, settings: ServerSettings) -> int:
    """Join the Ray cluster (`--ray-address`; none: the one on this machine, else a new
    local one), deploy, and serve until SIGTERM/SIGINT."""
    import ray

    from .cli import register_startup_adapter

    settings.check_exposure()
    if args.adapter:   # into the shared store before any replica starts; the ingress reads it at start
        store = IngressCore(config, 1, settings.max_adapter_bytes).store
        for name, source in args.adapter:
            register_startup_adapter(store, name, source)
    ray.init(address=args.ray_address, include_dashboard=False)
    options = {"num_cpus": args.num_cpus_per_replica}
    if args.num_gpus_per_replica:
        options["num_gpus"] = args.num_gpus_per_replica
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(ray_app(config, args.replicas, settings, args.max_adapters_per_replica, options),
                  name=APP_NAME, route_prefix="/")
        log.info("loraserve on Ray Serve: http://%s:%d (OpenAI API under /v1), %d engine replicas", settings.host,
                 settings.port, args.replicas)
        _wait_for_signal()
        return 0
    finally:
        _bounded(lambda: serve.delete(APP_NAME), DELETE_TIMEOUT_S)
        ray.shutdown()


DELETE_TIMEOUT_S = 60.0   # replicas get Ray Serve's graceful shutdown; do not hang on a broken cluster


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _bounded(fn, timeout: float) -> None:
    thread = threading.Thread(target=fn, name="loraserve-serve-delete", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        log.warning("removing the Ray Serve app did not finish within %.0f s; leaving it to Ray", timeout)
