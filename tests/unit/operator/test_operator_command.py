"""`amalia-operator run|rollout`: the operator's commands, moved out of `amalia-serve`."""

from __future__ import annotations

import pytest

from amalia_operator.__main__ import build_parser, main


def test_run_parses_namespaces_and_peering_flags_when_given() -> None:
    args = build_parser().parse_args(["run", "-n", "a", "--namespace=b", "--standalone", "-v"])
    assert (args.command, args.namespace, args.standalone, args.verbose) == ("run", ["a", "b"], True, True)


def test_bare_flags_are_refused_when_no_subcommand_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--namespace=amalia"])
    assert exited.value.code == 2
    assert "{run,rollout}" in capsys.readouterr().err


def test_rollout_reaches_rollout_parser_when_first_word(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    assert capsys.readouterr().out.startswith("usage: amalia-operator rollout")
