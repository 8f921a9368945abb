"""The web console (issue 7): server-rendered pages under /console, over the API's own services,
authentication, casbin authorization and audit. See docs/console.md."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.console.auth import PREFIX


def install(app: FastAPI) -> None:
    """Mount the console on the app: its pages, its stylesheet, its error pages."""
    from api.console.errors import install_console_error_handlers
    from api.console.render import STATIC
    from api.console.routes import router

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(STATIC)), name="console_static")
    install_console_error_handlers(app)
