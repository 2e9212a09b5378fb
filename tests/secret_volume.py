"""Writes files the way the kubelet updates a mounted Secret volume, for tests of reloads."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret_volume(root: Path, version: str, files: dict[str, str]) -> None:
    """Publish `files` in `root` as the kubelet's atomic writer does for a Secret volume.

    The data goes to a new `..<version>` directory, a `..data_tmp` symlink to it is renamed over
    `..data`, the old directory is removed, and the names a pod opens (`name` -> `..data/name`) never
    change: only what they resolve to does.
    """
    data = root / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text, encoding="utf-8")
    current = root / "..data"
    old = current.resolve() if current.is_symlink() else None
    (root / "..data_tmp").symlink_to(data.name)
    os.replace(root / "..data_tmp", current)
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    if old is not None:
        for stale in old.iterdir():
            stale.unlink()
        old.rmdir()
