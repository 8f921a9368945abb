"""casbin wiring: the one place that answers "may this role do this action on this resource?"."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import casbin

HERE = Path(__file__).parent


@lru_cache(maxsize=1)
def _enforcer() -> casbin.Enforcer:
    # casbin's file adapter skips lines starting with '#'
    return casbin.Enforcer(str(HERE / "model.conf"), str(HERE / "permissions.csv"))


def role_may(role: str, resource: str, action: str) -> bool:
    return bool(_enforcer().enforce(role, resource, action))
