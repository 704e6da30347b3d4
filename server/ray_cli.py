"""`sonar-llm ray`: the Ray Serve application from the command line.

Starts a local Ray instance (or joins one with `--address`), deploys the app with Serve's HTTP
proxy on `--host:--port`, and waits. On SIGTERM or SIGINT: the app drains (each replica
finishes what it holds within `shutdown_grace`), then what this process started is shut down
(the Serve application; with a local Ray instance, Serve and Ray themselves), so no Ray
process is left behind. A second signal skips the drain.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from server.log_config import configure_logging
from server.ray_app import build, scale_from_args
from server.settings import settings_from_args

log = logging.getLogger("sonar_llm.ray")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ray")
    g.add_argument("--address", default=None, help="join this Ray cluster (default: start one)")
    g.add_argument("--app-name", default="sonar-llm", help="Serve application name")
    g.add_argument("--route-prefix", default="/", help="Serve route prefix")
    g.add_argument("--ray-num-cpus", type=float, default=None, help="CPUs of a started Ray")
    g.add_argument("--ray-num-gpus", type=float, default=None, help="GPUs of a started Ray")
    g.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start Ray's dashboard with a started Ray (`serve status` needs it)",
    )


def start_ray(attempts: int = 3, **init: Any) -> None:
    """`ray.init`, retried when a started node misses Ray's start-up deadline.

    The raylet gives its agent 15 s to report its port; on an overloaded machine the agent's
    imports alone can take longer, and the node start fails although nothing is wrong."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("Ray start-up timed out (attempt %d of %d); retrying", attempt, attempts)
            ray.shutdown()


def run(args: argparse.Namespace) -> int:
    from ray import serve

    settings = settings_from_args(args)
    scale = scale_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    started = args.address is None
    init: dict[str, Any] = {"address": args.address, "log_to_driver": True}
    if started:
        init.update(
            num_cpus=args.ray_num_cpus,
            num_gpus=args.ray_num_gpus,
            include_dashboard=args.dashboard,
        )
    start_ray(**init)
    stop = threading.Event()
    forced = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if stop.is_set():
            forced.set()
        stop.set()

    # After ray.init, which installs its own SIGTERM handler (exit without cleanup).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if started:
            serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, scale), name=args.app_name, route_prefix=args.route_prefix)
        where = (
            f"http://{settings.host}:{settings.port}{args.route_prefix}"
            if started
            else "the cluster's Serve proxy"
        )
        log.info("ready: application %s on %s", args.app_name, where)
        print(f"sonar-llm ray: serving {args.app_name} on {where}", flush=True)
        stop.wait()
        log.info("stopping: draining application %s", args.app_name)
    finally:
        _tear_down(args.app_name, started, forced)
    return 0


def _tear_down(app_name: str, started: bool, forced: threading.Event) -> None:
    import ray
    from ray import serve

    try:
        if not forced.is_set():
            # Replicas stop taking requests and finish those they hold (within
            # graceful_shutdown_timeout_s), while the proxies still carry the answers out.
            serve.delete(app_name)
        if started:
            serve.shutdown()  # the controller and proxies: nothing else uses this Ray
    finally:
        ray.shutdown()  # with a started Ray: stops its processes (GCS, raylet, workers)
