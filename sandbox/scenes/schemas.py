"""Scene requests and answers as clients see them."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SceneType(StrEnum):
    underwriting = "underwriting"
    claims = "claims"
    pharma = "pharma"
    public_health = "public_health"
    other = "other"


class DisclosureThresholds(BaseModel):
    """The export checks' thresholds. Defaults are ACRO's (and common output-checking practice); a
    scene may only make them stricter, so each bound below starts at the default."""

    model_config = ConfigDict(extra="forbid")
    min_cell_count: int = Field(default=10, ge=10, le=1000)        # persons per cell
    dominance_n: int = Field(default=2, ge=2, le=10)               # (n, k) rule: the top n …
    dominance_k: float = Field(default=0.9, ge=0.5, le=0.9)        # … may not hold more than k of a sum
    p_ratio: float = Field(default=0.1, ge=0.1, le=0.5)            # p% rule
    k_anonymity: int = Field(default=5, ge=5, le=1000)             # rows: persons per quasi-identifier class
    l_diversity: int = Field(default=2, ge=2, le=100)              # rows: distinct sensitive values per class
    # rows: by how many rows two of the scene's row answers must differ, if at all (None: min_cell_count)
    min_difference: int | None = Field(default=None, ge=10, le=100_000)


class ReleasePolicy(BaseModel):
    """What may leave without a person: `dp_aggregates` lets differentially private aggregates go
    out automatically when their budget, PII and noisy-count checks pass (nothing exact decides
    it); everything else, row answers always, waits for reviewers (`reviewers_required` independent
    ones: 2 is OpenSAFELY's practice; a result with a failing check needs two reviewers' overrides)."""

    model_config = ConfigDict(extra="forbid")
    auto_release: Literal["none", "dp_aggregates"] = "none"
    reviewers_required: int = Field(default=1, ge=1, le=2)
    thresholds: DisclosureThresholds = DisclosureThresholds()


class TemplateIn(BaseModel):
    """An analysis template applied for with the scene: a shipped one by name (`library`), or the
    applicant's own `definition` (the format of docs/templates.md). Checked at application and
    again at approval; changing it means a new application round."""

    model_config = ConfigDict(extra="forbid")
    library: str | None = Field(default=None, min_length=1, max_length=64)
    definition: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "TemplateIn":
        if (self.library is None) == (self.definition is None):
            raise ValueError("give exactly one of 'library' or 'definition'")
        return self


class TemplateOut(BaseModel):
    name: str
    version: int
    level: str
    title: dict[str, str]
    upload: dict[str, Any]
    params: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    sql: str
    digest: str
    # per output, the catalog fields its value depends on; per field, the value combinations all
    # outputs can take for one person (what the office weighs before approving)
    disclosure: dict[str, Any] | None = None


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(min_length=1, max_length=128)
    field: str = Field(min_length=1, max_length=64)
    usage: str = Field(min_length=1, max_length=16)


class SceneIn(BaseModel):
    """A scene application. Missing or empty required parts are refused with a message each."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    purpose: str = Field(min_length=1, max_length=4000)
    scene_type: SceneType
    legal_basis: str = Field(default="", max_length=4000)
    consent_approach: str = Field(default="", max_length=4000)
    emergency_plan: str = Field(default="", max_length=8000)
    valid_from: date
    valid_to: date
    budget_epsilon: float = Field(gt=0)
    budget_delta: float = Field(default=0.0, ge=0)
    max_query_epsilon: float = Field(gt=0)
    max_contributions: int = Field(default=10, ge=1, le=1000)  # rows per person in an aggregate
    release_policy: ReleasePolicy = ReleasePolicy()
    # one pseudonym key for all the scene's answers, so they join on a person (the office approves
    # it; the row checks then run over the union); by default each answer has its own
    link_pseudonyms: bool = False
    items: list[ItemIn] = Field(min_length=1, max_length=500)
    templates: list[TemplateIn] = Field(default_factory=list, max_length=10)


class ScenePatch(BaseModel):
    """Edit a draft or returned application: any subset of the fields; `items` replaces the list."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, min_length=1, max_length=200)
    purpose: str | None = Field(default=None, min_length=1, max_length=4000)
    scene_type: SceneType | None = None
    legal_basis: str | None = Field(default=None, max_length=4000)
    consent_approach: str | None = Field(default=None, max_length=4000)
    emergency_plan: str | None = Field(default=None, max_length=8000)
    valid_from: date | None = None
    valid_to: date | None = None
    budget_epsilon: float | None = Field(default=None, gt=0)
    budget_delta: float | None = Field(default=None, ge=0)
    max_query_epsilon: float | None = Field(default=None, gt=0)
    max_contributions: int | None = Field(default=None, ge=1, le=1000)
    release_policy: ReleasePolicy | None = None
    link_pseudonyms: bool | None = None
    items: list[ItemIn] | None = Field(default=None, min_length=1, max_length=500)
    templates: list[TemplateIn] | None = Field(default=None, max_length=10)


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject", "return"]
    struck_items: list[int] = Field(default_factory=list, max_length=500)  # item ids
    comment: str = Field(default="", max_length=4000)


class ReasonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2000)


class EmergencyStopIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    org: str | None = Field(default=None, max_length=64)
    dataset: str | None = Field(default=None, max_length=128)
    reason: str = Field(min_length=1, max_length=2000)


class ItemOut(BaseModel):
    id: int
    dataset: str
    field: str
    usage: str
    struck: bool
    struck_reason: str


class EffectiveItem(BaseModel):
    dataset: str
    field: str
    usage: str


class Budget(BaseModel):
    epsilon: float
    delta: float
    max_query_epsilon: float
    max_contributions: int
    epsilon_spent: float
    epsilon_left: float
    delta_spent: float
    delta_left: float


class ReviewOut(BaseModel):
    round: int
    reviewer: str
    decision: str
    struck_items: list[int]
    comment: str
    created_at: datetime


class EventOut(BaseModel):
    action: str
    from_status: str
    to_status: str
    actor: str | None
    reason: str
    at: datetime


class Approvals(BaseModel):
    required: int
    this_round: list[str]


class SceneOut(BaseModel):
    id: int
    org: str
    applicant: str
    title: str
    purpose: str
    scene_type: str
    legal_basis: str
    consent_approach: str
    emergency_plan: str
    valid_from: date
    valid_to: date
    status: str          # effective: active and expired are derived from the validity window
    stored_status: str
    round: int
    budget: Budget
    release_policy: ReleasePolicy
    link_pseudonyms: bool = False   # the scene's answers share one pseudonym key (they join on a person)
    items: list[ItemOut]
    templates: list[TemplateOut] = []
    effective_items: list[EffectiveItem]  # what the scene may do now (empty unless active)
    approvals: Approvals
    reviews: list[ReviewOut]
    history: list[EventOut]
    created_at: datetime
    updated_at: datetime


class SceneSummary(BaseModel):
    id: int
    org: str
    title: str
    scene_type: str
    status: str
    valid_from: date
    valid_to: date
    updated_at: datetime


class Problem(BaseModel):
    """One reason an application is refused; `item` is the index in the submitted list, if any."""

    where: str
    item: int | None = None
    rule: str
    message: str
    message_zh: str


class Explanation(BaseModel):
    allowed: bool
    rule: str
    message: str
    message_zh: str
    scene_status: str
