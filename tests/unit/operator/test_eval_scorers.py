"""Scorers and the checks built on them (the variety lexicon: tests/unit/serve/test_variety.py)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from amalia_operator.evaluation import scorers
from amalia_operator.evaluation.checks import Check

CHECK = TypeAdapter(Check)


def check(spec: dict[str, object]) -> Check:
    return CHECK.validate_python(spec)


# === scorers ===


def test_normalise_ignores_case_accents_punctuation_and_spacing_when_comparing() -> None:
    assert scorers.normalise("  Açores,  e MADEIRA! ") == "acores e madeira"
    assert scorers.exact_match("Lisboa.", ["lisboa"])
    assert not scorers.exact_match("A capital é Lisboa.", ["Lisboa"])


def test_mentions_matches_whole_words_only_when_phrase_is_inside_a_longer_word() -> None:
    assert scorers.mentions("O número é 112.", "112")
    assert not scorers.mentions("Ligue 1120.", "112")
    assert scorers.mentions("Vá à Loja do  Cidadão!", "loja do cidadao")
    assert not scorers.mentions("Pescador", "pesca")


@pytest.mark.parametrize(
    ("text", "words"),
    [("Azul, imenso, profundo.", 3), ("O pequeno-almoço de hoje", 4), ("", 0), ("d'água 25", 2)],
)
def test_word_count_counts_hyphenated_forms_as_one_word_when_counting(
    text: str, words: int
) -> None:
    assert scorers.word_count(text) == words


def test_list_item_count_counts_bullets_and_numbers_but_not_prose_when_mixed() -> None:
    text = "Aqui estão:\n- Tejo\n* Douro\n• Mondego\n1. Sado\n2) Guadiana\n2026 foi um bom ano."
    assert scorers.list_item_count(text) == 5
    assert scorers.list_item_count("Tejo, Douro e Mondego.") == 0


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Uma frase.", 1),
        ("Uma frase. Outra frase! E uma pergunta?", 3),
        ("O Sr. Silva pagou 2.5 euros ao Dr. Costa.", 1),
        ("Sem ponto final", 1),
        ("Linha um\nLinha dois", 2),
        ("Reticências… E depois.", 2),
        ("   ", 0),
    ],
)
def test_sentence_count_keeps_abbreviations_and_decimals_when_splitting(
    text: str, sentences: int
) -> None:
    assert scorers.sentence_count(text) == sentences


def test_json_object_accepts_one_code_fence_but_not_prose_when_parsing() -> None:
    assert scorers.json_object('{"a": 1}') == {"a": 1}
    assert scorers.json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert scorers.json_object('Aqui está: {"a": 1}') is None
    assert scorers.json_object("[1, 2]") is None
    assert scorers.json_object("") is None


def test_is_uppercase_needs_a_cased_letter_and_no_lowercase_when_checking() -> None:
    assert scorers.is_uppercase("LISBOA É A CAPITAL, 2026!")
    assert not scorers.is_uppercase("LISBOa")
    assert not scorers.is_uppercase("2026")


# === checks ===


@pytest.mark.parametrize(
    ("spec", "answer", "passed"),
    [
        ({"type": "exact", "expected": "Lisboa"}, "lisboa.", True),
        ({"type": "exact", "expected": ["7", "sete"]}, "Sete", True),
        ({"type": "exact", "expected": "Lisboa"}, "É Lisboa.", False),
        ({"type": "contains", "expected": ["GNR", "Guarda Nacional Republicana"]}, "A GNR.", True),
        ({"type": "contains", "expected": "230"}, "São 2300.", False),
        ({"type": "regex", "pattern": r"808\s*24\s*24\s*24"}, "Ligue 808 24 24 24.", True),
        ({"type": "regex", "pattern": "^Caro", "ignoreCase": False}, "caro cliente", False),
        ({"type": "choice", "choices": ["sim", "não"], "answer": "sim"}, "Sim, fica.", True),
        ({"type": "choice", "choices": ["sim", "não"], "answer": "sim"}, "Sim e não.", False),
        ({"type": "choice", "choices": ["sim", "não"], "answer": "sim"}, "Talvez.", False),
        ({"type": "words", "min": 3, "max": 3}, "Azul, imenso, profundo.", True),
        ({"type": "words", "max": 3}, "O mar é azul.", False),
        ({"type": "words", "min": 2}, "Mar.", False),
        ({"type": "list", "items": 2}, "- a\n- b", True),
        ({"type": "list", "items": 2}, "- a\n- b\n- c", False),
        ({"type": "sentences", "count": 1}, "Uma só frase.", True),
        ({"type": "uppercase"}, "OBRIGADO", True),
        ({"type": "json", "keys": ["a"], "values": {"a": 34}}, '{"a": 34}', True),
        ({"type": "json", "keys": ["a"], "values": {"a": 34}}, '{"a": "34"}', False),
        ({"type": "json", "keys": ["a"], "values": {"a": True}}, '{"a": 1}', False),
        ({"type": "json", "keys": ["a"], "values": {"a": 1}}, '{"a": true}', False),
        ({"type": "json", "keys": ["a"], "exactKeys": True}, '{"a": 1, "b": 2}', False),
        ({"type": "json", "keys": ["a"]}, '{"a": 1, "b": 2}', True),
        ({"type": "variety", "expect": "autocarro"}, "O autocarro.", True),
        ({"type": "variety", "expect": "autocarro"}, "O autocarro, ou ônibus.", False),
        ({"type": "variety", "expect": "autocarro", "lexicon": False}, "Autocarro/ônibus", True),
        ({"type": "variety", "expect": "facto", "avoid": "fato"}, "Fato.", False),
        ({"type": "variety", "expect": "fato", "avoid": "terno"}, "Um fato.", True),
        (
            {"type": "all", "of": [{"type": "uppercase"}, {"type": "contains", "expected": "x"}]},
            "X!",
            True,
        ),
        (
            {"type": "all", "of": [{"type": "uppercase"}, {"type": "contains", "expected": "x"}]},
            "x!",
            False,
        ),
    ],
)
def test_check_scores_answer_as_specified_when_given(
    spec: dict[str, object], answer: str, passed: bool
) -> None:
    result = check(spec).score(answer)
    assert result.passed is passed, result.detail
    assert result.detail


def test_check_detail_says_what_was_measured_when_answer_fails() -> None:
    assert check({"type": "words", "min": 5}).score("duas palavras").detail == (
        "2 words, wanted at least 5"
    )
    choice = check({"type": "choice", "choices": ["sim", "não"], "answer": "sim"})
    assert choice.score("Sim e não").detail == "named ['sim', 'não'], wanted only 'sim'"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "regex", "pattern": "("}, "not a regular expression"),
        ({"type": "choice", "choices": ["a", "b"], "answer": "c"}, "is not one of the choices"),
        ({"type": "choice", "choices": ["Sim", "sim"], "answer": "sim"}, "choices must differ"),
        ({"type": "words"}, "needs min, max or both"),
        ({"type": "words", "min": 4, "max": 2}, "min must not exceed max"),
        ({"type": "json", "keys": ["a"], "values": {"b": 1}}, "keys not in keys"),
        ({"type": "all", "of": [{"type": "uppercase"}]}, "at least 2 items"),
        ({"type": "exact", "expected": []}, "at least 1 item"),
        ({"type": "upper"}, "does not match any of the expected tags"),
        ({"type": "uppercase", "strict": True}, "Extra inputs are not permitted"),
    ],
)
def test_check_is_refused_when_spec_is_invalid(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check(spec)
