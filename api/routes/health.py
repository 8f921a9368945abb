from fastapi import APIRouter, Request
from sqlalchemy import text

from pdao import __version__

router = APIRouter(tags=["health"])


@router.get("/health", name="health")
def health(request: Request) -> dict:
    """Liveness and database reachability. The only endpoint without authentication."""
    with request.app.state.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__}
