"""Alerts for the security reviewer (issue 5; being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["audit"])
