"""casbin wiring: the one place that answers "may this role do this action on this resource?" and
"may this tenant use this field this way in this scene?".

Role permissions are static (`role_model.conf` + `permissions.csv`). Scene policies live in the
metadata database (table `casbin_rule`, read through casbin-sqlalchemy-adapter). Each scene is a
domain; instead of one enforcer scanning every rule of every scene, a process keeps one small
enforcer per scene, keyed by the scene's `policy_version`. The scene row is read on every request
anyway, so a change made by another process (suspension, revocation, approval) is seen on the very
next request: a new version means a reload of just that scene's rules.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import casbin
from casbin_sqlalchemy_adapter import Adapter
from sqlalchemy import or_
from sqlalchemy.engine import Engine

from policies.models import CasbinRule

HERE = Path(__file__).parent
SCENE_MODEL = HERE / "scene_model.conf"
TENANT_ROLE = "tenant"


@lru_cache(maxsize=1)
def _role_enforcer() -> casbin.Enforcer:
    # casbin's file adapter skips lines starting with '#'
    return casbin.Enforcer(str(HERE / "role_model.conf"), str(HERE / "permissions.csv"))


def role_may(role: str, resource: str, action: str) -> bool:
    return bool(_role_enforcer().enforce(role, resource, action))


def scene_domain(scene_id: int) -> str:
    return f"scene:{scene_id}"


def org_subject(org_code: str) -> str:
    return f"org:{org_code}"


def item_object(dataset: str, field: str) -> str:
    return f"{dataset}.{field}"


class _SceneAdapter(Adapter):
    """The SQLAlchemy adapter, filtered to one scene: its `g` lines carry the domain in v2, its `p`
    lines in v1."""

    def filter_query(self, querydb, filter):  # noqa: A002, ANN001, ANN201 - the adapter's signature
        domain = filter.v1[0]
        return querydb.filter(or_(self._db_class.v1 == domain, self._db_class.v2 == domain)).order_by(
            self._db_class.id)


class _DomainFilter:
    def __init__(self, domain: str) -> None:
        self.ptype: list[str] = []
        self.v0: list[str] = []
        self.v1 = [domain]
        self.v2: list[str] = []
        self.v3: list[str] = []
        self.v4: list[str] = []
        self.v5: list[str] = []


class SceneEnforcers:
    """Per-process cache of one casbin enforcer per scene, refreshed by policy version."""

    def __init__(self, engine: Engine, capacity: int = 4096) -> None:
        self._adapter = _SceneAdapter(engine, db_class=CasbinRule, create_all_models=False, filtered=True)
        self._cache: OrderedDict[int, tuple[int, casbin.Enforcer]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def _load(self, scene_id: int) -> casbin.Enforcer:
        e = casbin.Enforcer(str(SCENE_MODEL))
        e.set_adapter(self._adapter)
        e.load_filtered_policy(_DomainFilter(scene_domain(scene_id)))
        return e

    def enforcer(self, scene_id: int, policy_version: int) -> casbin.Enforcer:
        with self._lock:
            hit = self._cache.get(scene_id)
            if hit is not None and hit[0] == policy_version:
                self._cache.move_to_end(scene_id)
                return hit[1]
        e = self._load(scene_id)
        with self._lock:
            self._cache[scene_id] = (policy_version, e)
            self._cache.move_to_end(scene_id)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return e

    def may(self, scene_id: int, policy_version: int, org_code: str, dataset: str, field: str, usage: str) -> bool:
        return bool(self.enforcer(scene_id, policy_version).enforce(
            org_subject(org_code), scene_domain(scene_id), item_object(dataset, field), usage))


def scene_policy_rows(scene_id: int, org_code: str, items: list[tuple[str, str, str]], *,
                      tenant_holds: bool) -> list[CasbinRule]:
    """The casbin rows of a scene: the tenant grouping (absent while suspended) and one `p` line per
    effective item."""
    dom = scene_domain(scene_id)
    rows = [CasbinRule(ptype="p", v0=TENANT_ROLE, v1=dom, v2=item_object(d, f), v3=u) for d, f, u in items]
    if tenant_holds:
        rows.append(CasbinRule(ptype="g", v0=org_subject(org_code), v1=TENANT_ROLE, v2=dom))
    return rows
