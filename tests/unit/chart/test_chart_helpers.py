"""Tests that need ../shared skip on a fresh clone and fail in CI, never pass silently there."""

from __future__ import annotations

import pytest
from chart_helpers import shared_file


def test_shared_file_skips_naming_what_is_missing_when_not_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"needs the thing: .*no-such-file is missing"):
        shared_file("no-such-file", "the thing")


def test_shared_file_fails_when_missing_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs the thing"):
        shared_file("no-such-file", "the thing")
