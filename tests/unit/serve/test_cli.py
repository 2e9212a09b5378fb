"""`amalia-serve`: commands that moved to `amalia-operator` say where they went."""

from __future__ import annotations

import pytest

from amalia_serve.cli import main


@pytest.mark.parametrize(
    ("argv", "replacement"),
    [(["operator", "-n", "amalia"], "amalia-operator run"), (["rollout", "status", "x"], "amalia-operator rollout")],
)
def test_moved_command_exits_naming_its_replacement_when_called(
    argv: list[str], replacement: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert f"use `{replacement}` with the same arguments" in capsys.readouterr().err
