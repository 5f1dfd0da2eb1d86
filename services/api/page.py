"""The chat page: ``GET /`` serves one static page (no build step, nothing from a CDN).
(Being built.)"""

from __future__ import annotations

from fastapi import APIRouter


def page_router() -> APIRouter:
    return APIRouter()
