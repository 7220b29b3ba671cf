"""The server: FastAPI routes first, then the Gradio playground mounted at "/", all run by uvicorn.

`python app.py` is what a Hugging Face Space (sdk: gradio) runs; it listens where GRADIO_SERVER_NAME/PORT say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.auth import playground_auth, require_api_key
from api.errors import gradio_error_handlers, install_error_handlers
from api.fallback import ApiFallback
from api.gradio_streams import UnknownStreams
from api.health import router as health_router
from api.metrics import HttpMetricsMiddleware, Metrics
from api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from api.openai import router as openai_router
from api.refusals import RefusalBudget, RefusalThrottleMiddleware
from api.routes import router
from api.server import DrainingServer, server_config
from api.tgi import router as tgi_router
from api.throttle import FailureBackoff, LoginBackoffMiddleware
from api.uploads import NoUploads
from inference import __version__
from inference.client import EngineClient, EngineState
from inference.engine import Engine
from inference.settings import Settings, get_settings

logger = logging.getLogger("app")


def create_app(
    settings: Settings | None = None, engine: EngineClient | None = None, start_engine: bool = True
) -> FastAPI:
    """The whole server. With `start_engine` its start-up loads the model in the background (the caller may have
    started it already, as `main` does)."""
    # Gradio and the playground are imported here rather than at the top so that `main` can start loading the model
    # first: the two take seconds each and overlap on two cores (docs/benchmarks.md, start-up).
    import gradio as gr

    from ui import CSS, THEME, build_ui

    settings = settings or get_settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads in the background: the server answers at once, /health says 503 until it is ready.
        loading = None
        if start_engine and engine.state is EngineState.STARTING:
            loading = asyncio.get_running_loop().run_in_executor(None, _start_engine, engine)
        yield
        engine.shutdown()
        if loading is not None and loading.done():
            loading.result()

    app = FastAPI(
        title="LLM serving",
        version=__version__,
        description="A small Hugging Face model behind a Gradio playground, named Gradio endpoints, REST routes and "
        "an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = Metrics(engine)
    app.state.auth_backoff = FailureBackoff()
    install_error_handlers(app)
    # Added innermost first: request ids and metrics see every request, even one refused for its size.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.state.refusal_budget = None
    if settings.refused_bytes_per_s > 0:  # outside the size limit, so its 413s are charged too
        app.state.refusal_budget = RefusalBudget(
            settings.refused_bytes_per_s, settings.refused_bytes_burst, settings.refusal_max_wait_s
        )
        app.add_middleware(RefusalThrottleMiddleware, budget=app.state.refusal_budget)
    # Always present, even with no origin listed: Gradio then leaves CORS to it (mount_gradio_app's documented
    # switch) instead of adding its own layer, which grants any Origin, with credentials, when Host isn't localhost.
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if settings.api_key is not None:
        app.add_middleware(LoginBackoffMiddleware, backoff=app.state.auth_backoff)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health_router)
    protected = [Depends(require_api_key)]
    app.include_router(router, dependencies=protected)
    app.include_router(openai_router, dependencies=protected)
    app.include_router(tgi_router, dependencies=protected)
    playground = build_ui(engine, settings)
    app.router.routes.extend([ApiFallback(), NoUploads(), UnknownStreams(playground)])
    # Mounted last: routes added after a mount at "/" would be shadowed by it.
    gr.mount_gradio_app(
        app,
        playground,
        path="/",
        # Only gr.Error messages (written for people) reach clients; any other exception shows as a plain "Error"
        # rather than Python's words for it.
        show_error=False,
        theme=THEME,
        css=CSS,
        auth=playground_auth(settings),
        auth_message="This server needs its API key: any user name, the key as password.",
        app_kwargs={"exception_handlers": gradio_error_handlers()},
    )
    return app


def _start_engine(engine: EngineClient, started: float | None = None) -> None:
    # A failure is already logged and kept by the engine; /health reports it.
    with contextlib.suppress(Exception):
        engine.start()
        if started is not None:
            logger.info("Model ready %.1f s after start", time.perf_counter() - started)


def main() -> None:
    started = time.perf_counter()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(settings)
    # The model loads while the web layer is imported and built; /health says 503 until it is ready.
    loading = threading.Thread(target=_start_engine, args=(engine, started), name="model-loader", daemon=True)
    loading.start()
    if settings.exit_on_load_failure:
        loading.join()
        if engine.state is EngineState.FAILED:
            sys.exit(f"The model failed to load, so the server is not starting: {engine.failure}")
    app = create_app(settings, engine, start_engine=False)
    logger.info("Web layer built %.1f s after start", time.perf_counter() - started)
    logger.info(
        "Serving on http://%s:%d (playground at /, API docs at /docs)", settings.server_name, settings.server_port
    )
    DrainingServer(server_config(app, settings), engine, settings.shutdown_grace_s).run()


if __name__ == "__main__":
    main()
