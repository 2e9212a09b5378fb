"""amalia-serve: serve AMALIA model variants behind one OpenAI-compatible endpoint on Ray Serve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amalia_serve.config import AmaliaServingArgs, EngineConfig, RoutingConfig, VariantConfig

__all__ = ["AmaliaServingArgs", "Engine", "EngineConfig", "RoutingConfig", "VariantConfig", "build_app"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from amalia_serve.app import build_app
    from amalia_serve.engine import Engine


def __getattr__(name: str) -> Any:
    # Ray loads only when the app is asked for; the config models and the engine interface stay light to import.
    if name == "build_app":
        from amalia_serve.app import build_app

        return build_app
    if name == "Engine":
        from amalia_serve.engine import Engine

        return Engine
    raise AttributeError(name)
