"""Scenes (场景), their data lists (清单), reviews and history."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint, false
from sqlalchemy.ext.mutable import MutableDict
from sqlmodel import Field, SQLModel

from pdao.kernel.db import utcnow


class Scene(SQLModel, table=True):
    __tablename__ = "scene"

    id: int | None = Field(default=None, primary_key=True)
    org_id: int = Field(foreign_key="organization.id", index=True)  # the tenant
    applicant_id: int = Field(foreign_key="app_user.id")
    title: str = Field(max_length=200)
    purpose: str
    scene_type: str = Field(max_length=20)
    legal_basis: str
    consent_approach: str = ""
    emergency_plan: str
    valid_from: date
    valid_to: date
    budget_epsilon: float
    budget_delta: float
    max_query_epsilon: float
    # Rows one person may contribute to an aggregate (the rest are dropped deterministically).
    max_contributions: int = Field(default=10, sa_column_kwargs={"server_default": "10"})
    epsilon_spent: float = 0.0
    delta_spent: float = 0.0
    release_policy: dict[str, Any] = Field(default_factory=dict,
                                           sa_column=Column(MutableDict.as_mutable(JSON), nullable=False))
    # Pseudonyms of one key for all the scene's answers (they join), approved by the office; else
    # each answer has its own key and no two answers' pseudonyms match.
    link_pseudonyms: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    status: str = Field(max_length=12, index=True)  # stored states; active/expired are derived from dates
    round: int = 0           # submission round: reviews count within the current round
    policy_version: int = 0  # bumped whenever the scene's casbin policies change (cache key)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SceneItem(SQLModel, table=True):
    __tablename__ = "scene_item"
    __table_args__ = (UniqueConstraint("scene_id", "dataset", "field", "usage"),)

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    dataset: str = Field(max_length=128, index=True)
    field: str = Field(max_length=64)
    usage: str = Field(max_length=16)
    struck: bool = False
    struck_by: int | None = Field(default=None, foreign_key="app_user.id")
    struck_reason: str = ""


class SceneReview(SQLModel, table=True):
    """One office member's opinion in one submission round."""

    __tablename__ = "scene_review"

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    round: int
    reviewer_id: int = Field(foreign_key="app_user.id")
    decision: str = Field(max_length=10)  # approve | reject | return
    struck_items: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    comment: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class SceneTemplate(SQLModel, table=True):
    """An analysis template applied for with the scene and approved with it (issue 6): the only
    way per-person derived values come out. `digest` is what the approval covers; a run checks it."""

    __tablename__ = "scene_template"
    __table_args__ = (UniqueConstraint("scene_id", "name", name="uq_scene_template_scene_id_name"),)

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    name: str = Field(max_length=64)
    version: int = 1
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))   # sandbox.templates.library format
    digest: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class SceneEvent(SQLModel, table=True):
    """Every transition: who, when, why."""

    __tablename__ = "scene_event"

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    action: str = Field(max_length=20)
    from_status: str = Field(max_length=12)
    to_status: str = Field(max_length=12)
    actor_id: int | None = Field(default=None, foreign_key="app_user.id")
    reason: str = ""
    at: datetime = Field(default_factory=utcnow)
