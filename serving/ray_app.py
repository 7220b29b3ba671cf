"""The Ray Serve application: `serve run serve_config.yaml` (import path `serving.ray_app:app`).

Three deployments:
- `EngineDeployment`: one `Engine` per replica (loads the model once, batches continuously); N replicas, or an
  autoscaling range. Its methods are what `RemoteEngine` calls: `stream` (a streaming call), `describe`.
- `Ingress`: `app.create_app(settings, RemoteEngine(...))`, unchanged: REST, OpenAI, health, metrics and the Gradio
  playground. One replica: Gradio's queue (and its session state) lives in one process.
- `ReplicaBoard`: where every engine replica reports its state and live figures twice a second; the ingress reads it
  for /health, /metrics and the playground's model panel. One replica, no CPU.

Settings come from the environment of each replica (MODEL_ID, MAX_BATCH_SIZE...; see inference/settings.py): the
shell's environment when `serve run` starts a local cluster, or `runtime_env.env_vars` in serve_config.yaml.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

from inference.client import EngineState, GenerationResult, TextChunk
from inference.engine import Engine
from inference.errors import EngineError
from inference.params import SamplingParams
from inference.prompts import PreparedPrompt
from inference.schemas import ModelInfo
from inference.settings import Settings
from serving.remote_engine import POLL_S, RemoteEngine
from serving.wire import WireError, pack_error

logger = logging.getLogger("serving.ray_app")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class ReplicaBoard:
    """The latest report of each engine replica, with the time it arrived."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, entry: dict[str, Any]) -> None:
        self._entries[str(entry["replica"])] = (time.monotonic(), entry)

    def read(self, max_age_s: float) -> list[dict[str, Any]]:
        now = time.monotonic()
        for replica, (at, _) in list(self._entries.items()):
            if now - at > 10 * max_age_s:  # long gone: forget it
                del self._entries[replica]
        return [entry for at, entry in self._entries.values() if now - at <= max_age_s]


def replica_settings() -> Settings:
    """Settings from this replica's environment; with TORCH_THREADS unset, one torch thread per CPU Ray gave it."""
    settings = Settings()
    if settings.torch_threads == 0:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        settings = settings.model_copy(update={"torch_threads": max(1, round(cpus))})
    return settings


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=5, health_check_timeout_s=30)
class EngineDeployment:
    """One engine replica: loads the model in its constructor, so Serve routes to it only once it can generate."""

    def __init__(self, board: DeploymentHandle[Any]) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.engine = Engine(replica_settings())
        self._board = board
        self._stopping = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="replica-reporter", daemon=True)
        self._reporter.start()
        try:
            self.engine.start()
        except Exception:
            self._report_from_thread()  # the board (and /health) shows why, while Serve retries the replica
            raise

    # ----- what the ingress calls ---------------------------------------------------------------------------------

    async def stream(
        self, prompt: PreparedPrompt, params: SamplingParams, request_id: str, route: str
    ) -> AsyncIterator[TextChunk | GenerationResult | WireError]:
        """The request's events; errors go out as WireError (EngineError does not pickle). If the caller cancels,
        Ray cancels this generator, and leaving `events()` cancels the request in the engine."""
        try:
            handle = self.engine.submit(prompt, params, request_id=request_id, route=route)
        except EngineError as error:
            yield pack_error(error, refused=True)
            return
        try:
            async for event in handle.events():
                yield event
        except EngineError as error:
            yield pack_error(error)

    def describe(self) -> tuple[ModelInfo, Any]:
        """The model's info and its tokenizer (the ingress tokenizes locally with it)."""
        assert self.engine.loaded is not None
        return self.engine.info(), self.engine.loaded.tokenizer

    def status(self) -> dict[str, Any]:
        return self._entry()

    def check_health(self) -> None:
        """Serve restarts a replica whose engine failed or whose scheduler thread died."""
        scheduler = self.engine._thread
        if not self.engine.ready or scheduler is None or not scheduler.is_alive():
            raise RuntimeError(f"engine is {self.engine.state.value}: {self.engine.failure or 'scheduler stopped'}")

    def __del__(self) -> None:
        self._stopping.set()
        self.engine.shutdown()

    # ----- reports to the board -------------------------------------------------------------------------------------

    def _entry(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {
            "replica": self.replica,
            "actor_name": self.actor_name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "state": self.engine.state.value,
            "failure": self.engine.failure,
            "snapshot": self.engine.snapshot(),
            "stats": {
                "requests_finished": stats.requests_finished,
                "requests_failed": stats.requests_failed,
                "requests_cancelled": stats.requests_cancelled,
                "prefills": stats.prefills,
                "decode_steps": stats.decode_steps,
                "largest_batch": stats.largest_batch,
            },
        }

    def _report(self) -> None:
        try:
            self._board.report.remote(self._entry()).result(timeout_s=5)
        except Exception as exc:
            logger.warning("Could not report to the replica board: %r", exc)

    def _report_from_thread(self) -> None:
        # The constructor runs on the replica's event loop, where a blocking handle call is refused.
        reporter = threading.Thread(target=self._report, daemon=True)
        reporter.start()
        reporter.join(5)

    def _report_loop(self) -> None:
        while not self._stopping.wait(POLL_S):
            if self.engine.state is not EngineState.LOADING:
                self._report()


# No CPU reserved: it only tokenizes and relays, and must never wait for a CPU the engine replicas hold.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The single-process app, as is, with a RemoteEngine in place of the engine. Serve's late-bound ingress: the
    app needs the handles this replica is built with, so Serve asks for it (`__serve_build_asgi_app__`) after the
    constructor, on the replica, instead of taking one app at import time."""

    def __init__(self, engine: DeploymentHandle[Any], board: DeploymentHandle[Any]) -> None:
        self._engine = engine
        self._board = board

    def __serve_build_asgi_app__(self) -> FastAPI:
        from app import create_app  # here, not at import: engine replicas need no Gradio
        from serving.metrics import ReplicaCollector

        settings = Settings()
        remote = RemoteEngine(settings, self._engine, self._board)
        fastapi_app = create_app(settings, remote)
        fastapi_app.state.metrics.registry.register(ReplicaCollector(remote))
        return fastapi_app


def deployment(decorated: object) -> Deployment:
    """A class under `@serve.deployment` is a Deployment, which the type checker can't see through the decorator."""
    return cast(Deployment, decorated)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application; `args` (serve_config.yaml's `args`, or a dict) may set `engine_replicas` and
    `engine_num_cpus`. serve_config.yaml's `deployments:` entries override these defaults."""
    args = args or {}
    settings = Settings()
    board = deployment(ReplicaBoard).bind()
    engine_options: dict[str, Any] = {
        # Each replica takes up to a full batch plus its own queue; beyond that Serve queues at the caller.
        "max_ongoing_requests": settings.max_batch_size + settings.max_queue_size,
        "num_replicas": int(args.get("engine_replicas", 1)),
    }
    if "engine_num_cpus" in args:
        engine_options["ray_actor_options"] = {"num_cpus": float(args["engine_num_cpus"])}
    engine = deployment(EngineDeployment).options(**engine_options).bind(board)
    return deployment(Ingress).bind(engine, board)


app = build_app()
