"""The server: FastAPI routes first, then the Gradio playground mounted at "/", all run by uvicorn.

`python app.py` is what a Hugging Face Space (sdk: gradio) runs; it listens where GRADIO_SERVER_NAME/PORT say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import gradio as gr
import uvicorn
from fastapi import FastAPI

from api.errors import install_error_handlers
from api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from api.openai import router as openai_router
from api.routes import router
from inference import __version__
from inference.engine import Engine
from inference.settings import Settings, get_settings
from ui import build_ui
from ui.handlers import Handlers

logger = logging.getLogger("app")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model loads in the background: the server answers at once, /health says 503 until it is ready.
        loading = asyncio.get_running_loop().run_in_executor(None, _start_engine, engine)
        yield
        engine.shutdown()
        if loading.done():
            loading.result()

    app = FastAPI(
        title="LLM serving",
        version=__version__,
        description="A small Hugging Face model behind a Gradio playground, named Gradio endpoints and REST routes.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.ui_handlers = Handlers(engine, settings)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(router)
    app.include_router(openai_router)
    # Mounted last: routes added after a mount at "/" would be shadowed by it.
    return gr.mount_gradio_app(app, build_ui(engine, settings, app.state.ui_handlers), path="/", show_error=True)


def _start_engine(engine: Engine) -> None:
    # A failure is already logged and kept by the engine; /health reports it.
    with contextlib.suppress(Exception):
        engine.start()


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info(
        "Serving on http://%s:%d (playground at /, API docs at /docs)", settings.server_name, settings.server_port
    )
    uvicorn.run(create_app(settings), host=settings.server_name, port=settings.server_port, log_level="warning")


if __name__ == "__main__":
    main()
