"""`RemoteEngine`: the `Engine` interface that api/ and ui/ use, backed by Ray Serve handles to the engine replicas.

What runs where:
- Tokenizing (`prepare_completion`, `prepare_chat`, `token_pieces`) runs here, in the ingress, with the tokenizer a
  replica loaded and sent over once at start (no model files needed on the ingress's node, no second conversion of the
  bundled model). The routes call `token_pieces` and `info` synchronously on the event loop, where a blocking remote
  call is not allowed, and tokenizing locally saves a round trip per request.
- Generation runs in the replicas: `submit` starts a streaming call (`handle.options(stream=True).stream.remote`);
  Ray Serve routes it to a replica (power of two choices on queue length). Cancelling the handle, or leaving its
  `events()` early (Stop in the playground, a client that disconnects), cancels the remote call, which cancels the
  request inside that replica's engine.
- Health, `snapshot()` and per-replica figures come from the `ReplicaBoard` deployment, where every engine replica
  reports its state twice a second; an entry not refreshed for `STALE_S` (a dead replica) no longer counts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from inference.client import EngineClient, EngineState, GenerationResult, RequestHandleBase, TextChunk
from inference.errors import EngineError, GenerationError, NotReadyError
from inference.params import SamplingParams
from inference.prompts import PreparedPrompt, PromptFormatter
from inference.schemas import ModelInfo
from inference.settings import Settings
from serving.wire import WireError, unpack_error

logger = logging.getLogger("serving.remote_engine")

POLL_S = 0.5
STALE_S = 3.0
# A request whose replica died before it sent anything is sent again, once, to another replica.
RETRIES_BEFORE_FIRST_EVENT = 1


def replica_gone(error: BaseException) -> bool:
    """The replica's actor died or is unreachable (as opposed to a bug inside it)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(error, RayActorError | ActorUnavailableError)


class RemoteRequestHandle(RequestHandleBase):
    """Same surface as `inference.engine.RequestHandle`: `events()`, `result()`, `cancel()`, `request_id`."""

    def __init__(
        self, engine: RemoteEngine, prompt: PreparedPrompt, params: SamplingParams, request_id: str, route: str
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self._route = route
        self.request_id = request_id
        self._ended = False
        self._response: Any = self._start()

    def _start(self) -> Any:
        method = self._engine.engine_handle.options(stream=True).stream
        return method.remote(self._prompt, self._params, self.request_id, self._route)

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            self._response.cancel()
            self._engine.report_end(self._route, "cancelled", None)

    def _end(self, status: str, result: GenerationResult | None) -> None:
        if not self._ended:
            self._ended = True
            self._engine.report_end(self._route, status, result)

    async def events(self) -> AsyncIterator[TextChunk | GenerationResult]:
        retries = RETRIES_BEFORE_FIRST_EVENT
        try:
            while True:
                received = False
                try:
                    async for event in self._response:
                        received = True
                        if isinstance(event, WireError):
                            error = unpack_error(event)
                            if event.refused:
                                self._ended = True  # never accepted: no outcome to count (as in the engine)
                            else:
                                self._end(f"error:{error.type}", None)
                            raise error
                        if isinstance(event, GenerationResult):
                            self._end(event.finish_reason, event)
                        yield event
                        if isinstance(event, GenerationResult):
                            return
                    raise GenerationError("The engine replica ended the stream without a result.")
                except EngineError:
                    raise
                except Exception as exc:
                    if replica_gone(exc) and not received and retries > 0 and not self._ended:
                        retries -= 1
                        logger.warning("request id=%s: engine replica lost, sending it again", self.request_id)
                        self._response = self._start()
                        continue
                    if replica_gone(exc):
                        failure: EngineError = NotReadyError(
                            "The engine replica serving this request went away (Ray Serve replaces it); retry."
                        )
                    else:
                        logger.error("request id=%s: engine replica call failed: %r", self.request_id, exc)
                        failure = GenerationError("Generation failed in the engine replica.")
                    self._end(f"error:{failure.type}", None)
                    raise failure from exc
        finally:
            self.cancel()


class RemoteEngine(EngineClient):
    """The `EngineClient` that create_app, the routes and the playground use, over Ray Serve engine replicas."""

    def __init__(self, settings: Settings, engine_handle: Any, board_handle: Any) -> None:
        self.settings = settings
        self.engine_handle = engine_handle
        self.board_handle = board_handle
        self.state = EngineState.STARTING
        self.failure: str | None = None
        self.observers = []  # told of every request this ingress sent, as by Engine
        # The latest fresh report of each engine replica (see ReplicaBoard).
        self.replicas: list[dict[str, Any]] = []
        self._info: ModelInfo | None = None
        self.formatter: PromptFormatter | None = None
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None

    # ----- life cycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Blocking (create_app's lifespan runs it in a thread): wait until an engine replica answers, take the model's
        info and tokenizer from it, then keep following the replicas' reports."""
        self.state = EngineState.LOADING
        self._poller = threading.Thread(target=self._poll_loop, name="replica-board-poller", daemon=True)
        self._poller.start()
        while not self._stopping.is_set():
            try:
                info, tokenizer = self.engine_handle.describe.remote().result(timeout_s=30)
            except Exception as exc:  # no replica yet (loading, restarting): Serve keeps the call queued until then
                logger.info("Waiting for an engine replica: %r", exc)
                time.sleep(1)
                continue
            self._info = info
            self.formatter = PromptFormatter(tokenizer)
            self._refresh()
            if self.state is EngineState.LOADING:
                self.state = EngineState.READY  # a replica just answered, even if its first report is not in yet
            return

    def _poll_loop(self) -> None:
        while not self._stopping.wait(POLL_S):
            self._refresh()

    def _refresh(self) -> None:
        try:
            entries: list[dict[str, Any]] = self.board_handle.read.remote(STALE_S).result(timeout_s=5)
        except Exception as exc:
            logger.warning("Could not read the replica board: %r", exc)
            entries = []
        self.replicas = sorted(entries, key=lambda entry: str(entry["replica"]))
        if self.state in (EngineState.DRAINING, EngineState.STOPPED):
            return
        ready = [entry for entry in entries if entry["state"] == EngineState.READY.value]
        failed = [entry for entry in entries if entry["state"] == EngineState.FAILED.value]
        if ready and self.formatter is not None:
            self.state, self.failure = EngineState.READY, None
        elif failed and len(failed) == len(entries):
            self.state, self.failure = EngineState.FAILED, str(failed[0].get("failure"))
        elif self.state is not EngineState.STARTING:
            self.state, self.failure = EngineState.LOADING, None

    def drain(self) -> None:
        if self.state is EngineState.READY:
            self.state = EngineState.DRAINING

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stops following the replicas; the replicas themselves belong to Ray Serve (serve shutdown stops them)."""
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(timeout_s)
        self.state = EngineState.STOPPED

    # ----- what callers use ---------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.info().context_length

    def submit(
        self, prompt: PreparedPrompt, params: SamplingParams, *, request_id: str | None = None, route: str = "-"
    ) -> RemoteRequestHandle:
        """Refusals this side can decide (not ready, draining, too long) raise here at once, as in Engine.submit; a
        replica's own refusal (its queue is full) arrives as the first event of the handle."""
        self._refuse_early(prompt, params)
        return RemoteRequestHandle(self, prompt, params, request_id or uuid.uuid4().hex[:12], route)

    def info(self) -> ModelInfo:
        self._serving_formatter()  # raises while not ready, as Engine.info does
        assert self._info is not None  # taken with the formatter
        return self._info

    def snapshot(self) -> dict[str, int]:
        """Summed over the engine replicas that reported in the last STALE_S seconds."""
        total = {"running": 0, "waiting": 0, "batch": 0}
        for entry in self.replicas:
            for key in total:
                total[key] += int(entry["snapshot"].get(key, 0))
        return total
