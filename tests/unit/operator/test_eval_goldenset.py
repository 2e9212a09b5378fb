"""Golden-set files: the shipped set, the loader's errors, and finding team sets in mounted folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from amalia_operator.evaluation import GoldenSetError, load_golden_sets
from amalia_operator.evaluation import __main__ as evaluation_cli
from amalia_operator.evaluation.goldenset import (
    PACKAGED_DIR,
    find_golden_sets,
    load_golden_set,
    parse_golden_set,
)

CORE = "pt-pt-core-v1"
MINIMAL = """\
apiVersion: evaluation.amalia.pt/v1
kind: GoldenSet
name: team-v1
items:
  - id: capital
    category: factos
    prompt: Qual é a capital de Portugal?
    check: {type: contains, expected: Lisboa}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# === the shipped set ===


def test_core_set_has_at_least_60_items_in_four_categories_when_loaded() -> None:
    (core,) = load_golden_sets([CORE], [PACKAGED_DIR])
    counts = Counter(item.category for item in core.items)
    assert len(core.items) >= 60
    assert set(counts) == {"administracao-publica", "factos", "instrucoes", "variedade"}
    assert min(counts.values()) >= 10


def test_core_set_declares_a_good_and_a_bad_answer_for_every_item_when_loaded() -> None:
    # Loading checked that each good answer passes and each bad answer fails its item's check.
    (core,) = load_golden_sets([CORE], [PACKAGED_DIR])
    assert all(item.good_answers and item.bad_answers for item in core.items)


def test_core_set_variety_items_fail_their_brazilian_answer_when_scored() -> None:
    (core,) = load_golden_sets([CORE], [PACKAGED_DIR])
    variety = {item.id: item for item in core.items if item.category == "variedade"}
    for item_id, brazilian in [
        ("autocarro", "Ônibus."),
        ("comboio", "Trem."),
        ("pequeno-almoco", "Café da manhã."),
        ("telemovel", "Celular."),
        ("ecra", "Tela."),
        ("casa-de-banho", "O banheiro."),
        ("frigorifico", "Geladeira."),
        ("facto", "Fato."),
        ("estas-a-fazer", "O que é que tu estás fazendo?"),
    ]:
        assert not variety[item_id].check.score(brazilian).passed, item_id
    # ...and "fato" as the European word for a suit passes.
    assert variety["fato-traje"].check.score("Um fato.").passed


def test_core_set_item_becomes_chat_messages_with_its_token_budget_when_asked() -> None:
    (core,) = load_golden_sets([CORE], [PACKAGED_DIR])
    item = next(i for i in core.items if i.id == "irs-prazo")
    assert core.chat(item) == [{"role": "user", "content": item.prompt}]
    assert core.max_tokens_for(item) == 96
    assert core.max_tokens_for(core.items[0]) == core.max_tokens == 64


# === loader errors ===


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(apiVersion="evaluation.amalia.pt/v2"), "apiVersion: Input should be"),
        (lambda d: d["items"][0].update(check={"type": "exact"}), "item 'capital' (items[0])"),
        (lambda d: d["items"][0].update(colour="blue"), "items[0]) colour: Extra inputs"),
        (lambda d: d["items"][0].pop("prompt"), "exactly one of prompt and messages"),
        (
            lambda d: d["items"][0].update(messages=[{"role": "user", "content": "Olá"}]),
            "exactly one of prompt and messages",
        ),
        (lambda d: d["items"].append(dict(d["items"][0])), "duplicate item ids: ['capital']"),
        (lambda d: d["items"][0].update(id="Capital City"), "item 'Capital City' (items[0]) id"),
        (
            lambda d: d["items"][0].update(goodAnswers=["Porto"]),
            "its check fails the good answer 'Porto'",
        ),
        (
            lambda d: d["items"][0].update(badAnswers=["Lisboa"]),
            "its check passes the bad answer 'Lisboa'",
        ),
        (lambda d: d.update(items=[]), "items: List should have at least 1 item"),
        (lambda d: d.update(name="other-v1"), "must match the file name 'team-v1'"),
    ],
)
def test_load_golden_set_names_file_and_item_when_document_is_invalid(
    tmp_path: Path, edit: object, message: str
) -> None:
    document = yaml.safe_load(MINIMAL)
    edit(document)  # type: ignore[operator]
    path = write(tmp_path, "team-v1", yaml.safe_dump(document, allow_unicode=True))
    with pytest.raises(GoldenSetError) as caught:
        load_golden_set(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("items: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_parse_golden_set_refuses_document_when_not_a_yaml_mapping(text: str, message: str) -> None:
    with pytest.raises(GoldenSetError, match=f"^team.yaml: {message}"):
        parse_golden_set(text, "team.yaml")


def test_load_golden_set_refuses_file_when_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "team-v1.yaml"
    path.write_bytes(MINIMAL.encode("utf-8").replace(b"capital de", b"capital \xff"))
    with pytest.raises(GoldenSetError, match="cannot read"):
        load_golden_set(path)


# === finding sets ===


def configmap_volume(root: Path, files: dict[str, str]) -> Path:
    """The layout kubelet gives a mounted ConfigMap: keys are links into a hidden `..data`."""
    stamp = root / "..2026_11_28_12_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, text in files.items():
        (stamp / name).write_text(text, encoding="utf-8")
    (root / "..data").symlink_to(stamp.name)
    for name in files:
        (root / name).symlink_to(Path("..data") / name)
    return root


def test_load_golden_sets_finds_team_set_when_mounted_from_configmap(tmp_path: Path) -> None:
    mounted = configmap_volume(tmp_path / "goldensets", {"team-v1.yaml": MINIMAL})
    sets = load_golden_sets([CORE, "team-v1"], [PACKAGED_DIR, mounted])
    assert [s.name for s in sets] == [CORE, "team-v1"]
    assert set(find_golden_sets([mounted])) == {"team-v1"}


def test_load_golden_sets_lists_what_exists_when_a_name_is_missing(tmp_path: Path) -> None:
    with pytest.raises(GoldenSetError, match=r"not found: \['nope-v1'\]; available: \['pt-pt"):
        load_golden_sets(["nope-v1"], [PACKAGED_DIR, tmp_path / "absent"])


def test_find_golden_sets_refuses_name_when_defined_in_two_folders(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write(first, "team-v1", MINIMAL)
    write(second, "team-v1", MINIMAL)
    with pytest.raises(GoldenSetError, match="'team-v1' is defined twice"):
        find_golden_sets([first, second])


def test_golden_set_dirs_come_from_environment_when_operator_starts(tmp_path: Path) -> None:
    code = "from amalia_operator.evaluation import goldenset as g; print(*g.DEFAULT_DIRS, sep='|')"
    env = {**os.environ, "AMALIA_GOLDEN_SET_DIRS": f"{tmp_path}/a{os.pathsep}{tmp_path}/b"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [f"{PACKAGED_DIR}|{tmp_path}/a|{tmp_path}/b"]


# === python -m amalia_operator.evaluation check ===


def test_check_command_reports_each_file_and_fails_when_one_is_invalid(tmp_path: Path) -> None:
    good = write(tmp_path, "team-v1", MINIMAL)
    bad = write(tmp_path, "other-v1", MINIMAL.replace("contains", "containz"))
    out = io.StringIO()
    assert evaluation_cli.main(["check", str(good)], out) == 0
    assert evaluation_cli.main(["check", str(good), str(bad)], out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"ok: {good}: team-v1, 1 items"
    assert lines[2].startswith(f"error: {bad}: item 'capital' (items[0]) check: Input tag")
