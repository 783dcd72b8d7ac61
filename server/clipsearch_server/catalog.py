"""The model catalog shipped in models/: recommended open_clip models and extra configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    pretrained: str
    dim: int
    image_size: int
    notes: str = ""


def _models_dir() -> Path:
    return Path(str(resources.files("clipsearch_server.models")))


def load_catalog() -> list[CatalogEntry]:
    """Every recommended model, in the catalog's order (the default first)."""
    data = json.loads((_models_dir() / "catalog.json").read_text(encoding="utf-8"))
    return [CatalogEntry(**entry) for entry in data["models"]]


def default_pretrained(model: str) -> str | None:
    """The catalog's pretrained tag for an architecture, if it lists one."""
    return next((e.pretrained for e in load_catalog() if e.name == model), None)


def bundled_config_dir() -> Path:
    """Folder of the open_clip configs we ship (e.g. clipsearch-tiny)."""
    return _models_dir() / "configs"
