"""The audit log for auditors and the office: events, verification, export (issue 5; being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["audit"])
