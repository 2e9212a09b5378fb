"""JSON merge patches (RFC 7386) that turn one stored object into another.

A merge patch merges nested objects instead of replacing them, so writing a smaller object over a
larger one leaves the keys it lacks in place: a status that stops naming a removed variant in
`weights`, or drops `analysis.outageSince`, would keep the old value for ever. Pure; no kopf.
"""

from __future__ import annotations

from typing import Any


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from `old` to `new`: removed keys become null, nested objects are diffed,
    lists and scalars are replaced when they differ. Empty when nothing changed."""
    patch: dict[str, Any] = dict.fromkeys(old.keys() - new.keys())
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch
