"""Langchain-Chatchat 0.3 compatibility routes (``/chat/kb_chat``, ``/knowledge_base/*``),
mapped onto the edge's own services. (Being built.)"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends

from services.api.settings import ApiSettings


def chatchat_router(authorize: Callable, settings: ApiSettings) -> APIRouter:
    return APIRouter(dependencies=[Depends(authorize)], tags=["chatchat compatibility"])
