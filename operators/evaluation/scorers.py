"""Measurements of one answer's text: pure functions, no I/O, unit-tested in milliseconds.

Each function measures one thing (is it this text, how many words, is it JSON); the checks in
checks.py compare the measurement with what a golden-set item asks for.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\w+(?:[-'’]\w+)*")
_NOT_ALNUM = re.compile(r"[^\w]+|_")
# A list item: a line that starts with a bullet or with `1.` / `1)`.
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
# Portuguese abbreviations whose dot does not end a sentence ("O Sr. Silva chegou." is one).
_ABBREVIATION = re.compile(
    r"\b(sr|sra|srs|dr|dra|drs|eng|prof|profa|av|art|arts|pág|n\.º|p\. ex)\.(?=\s)", re.IGNORECASE
)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(?P<body>.*)\n```$", re.DOTALL)


def fold(text: str) -> str:
    """Case- and accent-insensitive form: `Ônibus` and `onibus` fold to the same string."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return unicodedata.normalize(
        "NFC", "".join(c for c in decomposed if not unicodedata.combining(c))
    )


def normalise(text: str) -> str:
    """`fold`, then punctuation to spaces and whitespace collapsed: `" Lisboa."` -> `"lisboa"`."""
    return " ".join(_NOT_ALNUM.sub(" ", fold(text)).split())


def exact_match(answer: str, expected: Sequence[str]) -> bool:
    """The whole answer is one of `expected`, ignoring case, accents, punctuation and spacing."""
    return normalise(answer) in {normalise(e) for e in expected}


def mentions(answer: str, phrase: str) -> bool:
    """`phrase` occurs in the answer as whole words, ignoring case, accents and punctuation."""
    return f" {normalise(phrase)} " in f" {normalise(answer)} "


def mentioned(answer: str, phrases: Sequence[str]) -> list[str]:
    """The phrases the answer mentions (see `mentions`), in the order given."""
    return [p for p in phrases if mentions(answer, p)]


def word_count(text: str) -> int:
    """Words, counting a hyphenated or apostrophed form (`pequeno-almoço`, `d'água`) as one."""
    return len(_WORD.findall(text))


def list_item_count(text: str) -> int:
    """Lines that are list items (`- x`, `* x`, `• x`, `1. x`, `1) x`); other lines are ignored."""
    return len(_LIST_ITEM.findall(text))


def sentence_count(text: str) -> int:
    """Sentences: split after `.`, `!`, `?` or `…` followed by a space, and at line breaks.

    A decimal point (`1.5`) and common abbreviations (`Sr.`, `Dr.`, `n.º`) do not end a sentence.
    """
    protected = _ABBREVIATION.sub(lambda m: m.group(1), text.strip())
    return sum(1 for part in _SENTENCE_END.split(protected) if re.search(r"\w", part))


def json_object(text: str) -> dict[str, Any] | None:
    """The answer parsed as one JSON object, or None. One surrounding Markdown code fence is
    allowed, since chat models often add it even when told not to; anything else around the
    object is not."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group("body").strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def is_uppercase(text: str) -> bool:
    """Every cased letter is uppercase, and there is at least one (digits alone are not enough)."""
    cased = [c for c in text if c.lower() != c.upper()]
    return bool(cased) and all(c.isupper() for c in cased)
