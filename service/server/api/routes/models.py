from __future__ import annotations

import dataclasses

from fastapi import APIRouter

import greenmim_core
from service.schemas import ModelList, ModelOut
from service.server.api.deps import CallerDep

router = APIRouter(prefix="/v1", tags=["models"])


@router.get(
    "/models", response_model=ModelList, summary="Registered architectures and their defaults"
)
def list_models(_caller: CallerDep) -> ModelList:
    items = []
    for name in greenmim_core.list_models():
        cfg = dataclasses.asdict(greenmim_core.get_config(name))
        cfg.pop("name", None)
        items.append(ModelOut(name=name, defaults=cfg))
    return ModelList(items=items)
