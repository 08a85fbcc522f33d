"""michi-serve: MichiAI workers as a Ray Serve application, one replica per GPU.

Each replica runs the worker app of ``app.py`` (``create_app``: its own ``DuplexEngine``,
the same ``/v1/call`` protocol, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/stats``) behind
Serve's HTTP proxy, so a client reaches the whole application at one URL
(``ws://host:8000/v1/call``) with the same ``RemoteWorker`` and token as a single worker.

- **Sticky calls**: a call is one WebSocket, which Serve's proxy holds on the replica that
  accepted it until it closes; there is no per-message routing to go wrong.
- **Admission**: ``max_ongoing_requests`` is the replica's slot capacity plus
  ``admission_headroom`` (1). Serve's router sends each request to the less busy of two
  replicas, so calls spread over the replicas and a full one gets a call only when the other
  is full too; the replica then refuses it at once (fatal ``error`` 1013) and ``RemoteWorker``
  tries again (the next attempt may meet a replica with a free slot). Without headroom, Serve
  would hold such a call in its proxy's queue until a slot frees or the client's connect
  timeout, and answer the calls beyond ``max_queued_calls`` with HTTP 500 (Serve's 503 does
  not survive the WebSocket upgrade). The headroom also lets ``/readyz`` and ``/metrics``
  reach a full replica.
- **Autoscaling** on ongoing calls (queued ones included): Serve aims at
  ``target_utilization`` x slot capacity calls per replica, between ``min_replicas`` and
  ``max_replicas``; a replica chosen to stop takes no new call and drains its calls for up to
  ``graceful_shutdown_timeout_s`` before its remaining calls get ``ended(shutdown)`` (1001).
- **Health**: Serve restarts a replica whose engine stopped (``check_health``); a replica
  that dies takes its calls with it (their clients see the connection drop and call again,
  landing on a live replica).

Start it with ``michi-serve`` (below), ``serve run pipecat_michi.worker.serve:build_app``, or
``serve deploy deploy/serve.yaml`` on a Ray cluster (README, "Scaling out"). The bearer token is
read by every replica from its own environment (``MICHI_WORKER_TOKEN``, set where Ray runs):
it never travels in the application's arguments, which Serve stores and shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import ray
import torch
from fastapi import FastAPI
from loguru import logger
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve
from ray.exceptions import RayError
from ray.serve.deployment import Application

from pipecat_michi.worker.protocol import CALL_PATH
from pipecat_michi.worker.app import create_app
from pipecat_michi.worker.config import WorkerConfig, WorkerConfigError, check_config, given_flags

DEPLOYMENT_NAME: Final = "MichiWorker"
# Serve names each replica's actor "SERVE_REPLICA::<app>#<deployment>#<id>" in this namespace.
_SERVE_NAMESPACE: Final = "serve"
_REPLICA_ACTOR_PREFIX: Final = "SERVE_REPLICA::"


class ServeConfig(BaseSettings):
    """How the Serve application scales its workers.

    Read from the environment with the prefix ``MICHI_SERVE_``; keyword arguments (the
    builder's ``args``: ``serve run ... key=value``, or ``args:`` in a Serve config file) win.
    The workers themselves are configured by ``worker``: ``WorkerConfig`` fields, the rest
    from the builder's ``MICHI_WORKER_*`` environment, except the token (see the module).

    Parameters:
        app_name: Serve application name.
        route_prefix: HTTP prefix of the application; calls go to ``<prefix>/v1/call``.
        min_replicas: Replicas kept however quiet it is.
        max_replicas: Upper bound; ``None``: one per GPU of the Ray cluster (1 without GPUs).
        initial_replicas: Replicas at deployment; ``None``: ``min_replicas``.
        target_utilization: Share of a replica's slots that autoscaling aims to keep busy.
        upscale_delay_s: Load must stay above target this long before a replica is added.
        downscale_delay_s: Load must stay below target this long before one is removed.
        gpus_per_replica: GPUs reserved per replica; ``None``: 1 when the cluster has GPUs.
        cpus_per_replica: CPUs reserved per replica (its event loop, codec and tokenizer).
        admission_headroom: Requests a replica takes beyond its slots: extra calls it refuses
            at once (1013) and HTTP probes. 0: Serve queues calls for a full application.
        max_queued_calls: Requests one proxy holds while every replica is at its limit; the
            next ones are refused (HTTP 500 on a WebSocket upgrade).
        graceful_shutdown_timeout_s: How long a stopping replica lets its calls finish.
        worker: ``WorkerConfig`` fields for every replica (``engine``, timeouts, limits).
    """

    model_config = SettingsConfigDict(env_prefix="MICHI_SERVE_", extra="forbid", frozen=True)

    app_name: str = "michi"
    route_prefix: str = "/"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_utilization: float = Field(default=0.75, gt=0.0, le=1.0)
    upscale_delay_s: float = Field(default=10.0, ge=0.0)
    downscale_delay_s: float = Field(default=300.0, ge=0.0)
    gpus_per_replica: float | None = Field(default=None, ge=0.0)
    cpus_per_replica: float = Field(default=1.0, ge=0.0)
    admission_headroom: int = Field(default=1, ge=0)
    max_queued_calls: int = Field(default=4, ge=1)
    graceful_shutdown_timeout_s: float = Field(default=120.0, gt=0.0)
    worker: dict[str, Any] = Field(default_factory=dict)


@serve.ingress()
class MichiWorkerReplica:
    """One Serve replica: one worker app with its own engine (one GPU when there are any).

    ``worker`` holds every ``WorkerConfig`` field but the tokens, which the replica reads from
    its environment (``MICHI_WORKER_TOKEN``, ``MICHI_WORKER_TENANT_TOKENS``).
    """

    def __init__(self, worker: dict[str, Any]) -> None:
        self._config = WorkerConfig(**worker)
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve runs the app's lifespan right after: the engine (and the model) start there.
        # Serve's proxy does not bound WebSocket messages to ours; the worker checks the size
        # of each message itself (1009 beyond ``max_message_bytes``).
        self._app = create_app(self._config)
        return self._app

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped is replaced."""
        worker = self._app.state.worker if self._app is not None else None
        if worker is None or not worker.started:
            raise RuntimeError("the worker's engine is not running")

    def record_routing_stats(self) -> dict[str, Any]:
        """Slots of this replica, for ``replica_stats`` (and any custom Serve request router)."""
        worker = self._app.state.worker if self._app is not None else None
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "slots_in_use": worker.engine.sessions_in_use if worker is not None else 0,
            "slot_capacity": self._config.engine.slot_capacity,
            "calls": len(worker.calls) if worker is not None else 0,
            "ticks": worker.engine.stats.ticks if worker is not None else 0,
        }


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application: ``serve run pipecat_michi.worker.serve:build_app key=value ...``
    or ``import_path`` in a Serve config file (``args`` are ``ServeConfig`` fields).

    Raises:
        WorkerConfigError: The workers' configuration cannot be served (no token, ...).
        pydantic.ValidationError: A bad argument.
    """
    config = ServeConfig(**(args or {}))
    secrets = sorted({"token", "tenant_tokens"} & set(config.worker))
    if secrets:
        raise WorkerConfigError(
            f"{' and '.join(secrets)} do not go in the application's arguments (Serve stores and shows them): "
            "set MICHI_WORKER_TOKEN (and MICHI_WORKER_TENANT_TOKENS) where Ray runs, on every node"
        )
    worker = WorkerConfig(**config.worker)
    check_config(worker)  # here, where the operator sees it, rather than in every replica
    options = deployment_options(config, worker.engine.slot_capacity, _cluster_gpus())
    scaling = options["autoscaling_config"]
    logger.info(
        f"Serve app {config.app_name!r}: {scaling['min_replicas']}-{scaling['max_replicas']} replicas of "
        f"{worker.engine.slot_capacity} slots, {options['ray_actor_options']['num_gpus']:g} GPU and "
        f"{config.cpus_per_replica:g} CPU each"
    )
    deployment = serve.deployment(MichiWorkerReplica, name=DEPLOYMENT_NAME, **options)
    # Everything but the token: replicas read it from their own environment.
    return deployment.bind(worker.model_dump(mode="json", exclude={"token", "tenant_tokens"}))


def deployment_options(config: ServeConfig, slot_capacity: int, cluster_gpus: int) -> dict[str, Any]:
    """``serve.deployment`` options for replicas of ``slot_capacity`` slots on a cluster with
    ``cluster_gpus`` GPUs: one GPU each when there are any, admission and autoscaling on calls."""
    gpus_per_replica = config.gpus_per_replica
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if cluster_gpus else 0.0
    max_replicas = config.max_replicas
    if max_replicas is None:
        max_replicas = max(1, int(cluster_gpus / gpus_per_replica)) if gpus_per_replica else 1
    autoscaling: dict[str, Any] = {
        "min_replicas": config.min_replicas,
        "max_replicas": max(max_replicas, config.min_replicas),
        "target_ongoing_requests": slot_capacity * config.target_utilization,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
    }
    if config.initial_replicas is not None:
        autoscaling["initial_replicas"] = config.initial_replicas
    return {
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": gpus_per_replica},
        "max_ongoing_requests": slot_capacity + config.admission_headroom,
        "max_queued_requests": config.max_queued_calls,
        "autoscaling_config": autoscaling,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
    }


def _cluster_gpus() -> int:
    """GPUs of the Ray cluster when connected (``serve deploy`` builds inside it), else of
    this machine (``serve run``/``michi-serve`` build before starting Ray)."""
    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    return torch.cuda.device_count()


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's view of its slots (``MichiWorkerReplica.record_routing_stats``)."""

    actor_name: str
    pid: int
    node_id: str
    slots_in_use: int
    slot_capacity: int
    calls: int  # WebSockets open on the replica's /v1/call, admitted or not
    ticks: int  # engine ticks so far


async def replica_stats(app_name: str = "michi", timeout_s: float = 10.0) -> list[ReplicaStats]:
    """Ask every live replica of ``app_name`` for its slots, straight through its actor (Serve's
    HTTP routing cannot address one replica). Needs a Ray connection (``ray.init``); replicas
    that die meanwhile are left out."""
    prefix = f"{_REPLICA_ACTOR_PREFIX}{app_name}#{DEPLOYMENT_NAME}#"
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == _SERVE_NAMESPACE and actor["name"].startswith(prefix)
    ]
    stats = []
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=_SERVE_NAMESPACE)
            reply = await asyncio.wait_for(actor.record_routing_stats.remote(), timeout_s)
        except (RayError, ValueError, TimeoutError):
            continue  # gone (or going, or still starting) between the listing and the call
        stats.append(ReplicaStats(actor_name=name, **reply))
    return stats


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="michi-serve",
        description="Serve MichiAI calls from Ray Serve replicas (one per GPU) behind one URL. The "
        "token comes from MICHI_WORKER_TOKEN on every Ray node; other settings from MICHI_SERVE_* "
        "and MICHI_WORKER_* environment variables; flags win.",
    )
    parser.add_argument("--address", help="Ray cluster to join (auto, or host:6379); default: start Ray here")
    parser.add_argument("--host", default="127.0.0.1", help="interface Serve's HTTP proxy binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default 8000)")
    parser.add_argument("--min-replicas", type=int, help="replicas kept when idle (default 1)")
    parser.add_argument("--max-replicas", type=int, help="replica limit (default: one per GPU, 1 without)")
    parser.add_argument("--gpus-per-replica", type=float, help="default: 1 when there are GPUs, else 0")
    parser.add_argument("--cpus-per-replica", type=float, help="default 1")
    parser.add_argument("--preset", help="model preset with random weights (tiny, michi-530m)")
    parser.add_argument("--checkpoint", help="MichiAI checkpoint directory, on every node (wins over --preset)")
    parser.add_argument("--device", help="auto, cpu, cuda, ...")
    parser.add_argument("--slots", type=int, help="slot capacity of each replica")
    parser.add_argument("--threads", type=int, help="torch CPU threads per replica")
    return parser.parse_args(argv)


def _build_args(args: argparse.Namespace) -> dict[str, Any]:
    serve_args = given_flags(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
    )
    engine = given_flags(
        preset=args.preset, checkpoint=args.checkpoint, device=args.device, slot_capacity=args.slots,
        torch_threads=args.threads,
    )
    if engine:
        serve_args["worker"] = {"engine": engine}  # merged with MICHI_WORKER_ENGINE__* by pydantic-settings
    return serve_args


@contextlib.contextmanager
def serving(
    app_args: dict[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Deploy the application (``build_app(app_args)``) and yield its call URL; take it down
    on exit (calls drain for ``graceful_shutdown_timeout_s``).

    Ray is started in this process unless ``address`` names a cluster to join, in which case
    only the application is deleted on exit. ``ray_options`` go to ``ray.init`` (``num_cpus``,
    ``runtime_env``, ...).

    Raises:
        WorkerConfigError, pydantic.ValidationError: As ``build_app``, before Ray starts.
    """
    app = build_app(app_args)
    config = ServeConfig(**(app_args or {}))
    ray.init(address=address, namespace=_SERVE_NAMESPACE, **(ray_options or {}))
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
        yield f"ws://{host}:{port}{config.route_prefix.rstrip('/')}{CALL_PATH}"
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(config.app_name)
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    """``michi-serve``: deploy the application on Ray (started here unless ``--address``),
    serve until SIGINT/SIGTERM, then take it down."""
    args = _parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with serving(_build_args(args), host=args.host, port=args.port, address=args.address) as url:
            logger.info(f"Serving calls at {url}; Ctrl-C to stop")
            while not stop.wait(1.0):
                pass
            logger.info("Stopping: calls drain, then the replicas go")
    except (ValidationError, WorkerConfigError) as exc:
        raise SystemExit(f"michi-serve: {exc}") from None


if __name__ == "__main__":
    main()
