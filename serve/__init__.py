"""amalia-serve: serve AMALIA model variants behind one OpenAI-compatible endpoint on Ray Serve."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["AmaliaServingArgs", "Engine", "EngineConfig", "RoutingConfig", "VariantConfig", "build_app"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from amalia_serve.app import build_app
    from amalia_serve.config import AmaliaServingArgs, EngineConfig, RoutingConfig, VariantConfig
    from amalia_serve.engine import Engine

# Every export loads on first use: Ray loads only when the app is asked for.
_EXPORTS = {
    "build_app": "amalia_serve.app",
    "Engine": "amalia_serve.engine",
    "AmaliaServingArgs": "amalia_serve.config",
    "EngineConfig": "amalia_serve.config",
    "RoutingConfig": "amalia_serve.config",
    "VariantConfig": "amalia_serve.config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(module), name)
