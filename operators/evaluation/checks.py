"""What a golden-set item asks of an answer: one typed check per `type`, each a pure `score()`.

Text checks ignore case, accents, punctuation and spacing (scorers.normalise), so `Lisboa.` and
`lisboa` are the same answer; `uppercase` is the one check where case is the point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from amalia_operator.evaluation import scorers
from amalia_operator.models import WireModel
from amalia_variety import count_markers

# Keeps a `detail` readable in an Event or a status field.
_EXCERPT_CHARS = 60


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    detail: str  # why, in a few words: "3 words, wanted 5"


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 1] + "…")


def _any_mentioned(answer: str, phrases: list[str], verb: str) -> CheckResult:
    found = scorers.mentioned(answer, phrases)
    if found:
        return CheckResult(True, f"{verb} {found[0]!r}")
    return CheckResult(False, f"{_excerpt(answer)} {verb} none of {phrases}")


def _one_or_more(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


class ExactCheck(WireModel):
    """The whole answer is one of `expected`."""

    type: Literal["exact"]
    expected: list[str] = Field(..., min_length=1, description="Accepted answers.")

    _one = field_validator("expected", mode="before")(_one_or_more)

    def score(self, answer: str) -> CheckResult:
        if scorers.exact_match(answer, self.expected):
            return CheckResult(True, "exact match")
        return CheckResult(False, f"{_excerpt(answer)} is not {self.expected}")


class ContainsCheck(WireModel):
    """The answer mentions one of `expected` as whole words."""

    type: Literal["contains"]
    expected: list[str] = Field(..., min_length=1, description="Accepted phrases; any one.")

    _one = field_validator("expected", mode="before")(_one_or_more)

    def score(self, answer: str) -> CheckResult:
        return _any_mentioned(answer, self.expected, "mentions")


class RegexCheck(WireModel):
    """`pattern` is found in the answer (Python `re.search`)."""

    type: Literal["regex"]
    pattern: str = Field(..., min_length=1)
    ignore_case: bool = True

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return pattern

    def score(self, answer: str) -> CheckResult:
        flags = re.IGNORECASE if self.ignore_case else 0
        if re.search(self.pattern, answer, flags):
            return CheckResult(True, "pattern found")
        return CheckResult(False, f"{_excerpt(answer)} does not match /{self.pattern}/")


class ChoiceCheck(WireModel):
    """The answer names `answer` and no other of `choices` (naming several is hedging)."""

    type: Literal["choice"]
    choices: list[str] = Field(..., min_length=2)
    answer: str

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> ChoiceCheck:
        folded = [scorers.normalise(c) for c in self.choices]
        if len(set(folded)) != len(folded):
            raise ValueError("choices must differ after ignoring case, accents and punctuation")
        if scorers.normalise(self.answer) not in folded:
            raise ValueError(f"answer {self.answer!r} is not one of the choices {self.choices}")
        return self

    def score(self, answer: str) -> CheckResult:
        named = scorers.mentioned(answer, self.choices)
        if [scorers.normalise(n) for n in named] == [scorers.normalise(self.answer)]:
            return CheckResult(True, f"chose {self.answer!r}")
        return CheckResult(False, f"named {named or 'no choice'}, wanted only {self.answer!r}")


class WordsCheck(WireModel):
    """The answer has between `min` and `max` words (either bound may be left out)."""

    type: Literal["words"]
    min: int | None = Field(None, ge=1)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> WordsCheck:
        if self.min is None and self.max is None:
            raise ValueError("a words check needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def score(self, answer: str) -> CheckResult:
        n = scorers.word_count(answer)
        ok = (self.min is None or n >= self.min) and (self.max is None or n <= self.max)
        wanted = " and ".join(
            f"{word} {bound}"
            for word, bound in (("at least", self.min), ("at most", self.max))
            if bound is not None
        )
        return CheckResult(ok, f"{n} words, wanted {wanted}")


class ListCheck(WireModel):
    """The answer is a list of exactly `items` items (bulleted or numbered lines)."""

    type: Literal["list"]
    items: int = Field(..., ge=1)

    def score(self, answer: str) -> CheckResult:
        n = scorers.list_item_count(answer)
        return CheckResult(n == self.items, f"{n} list items, wanted {self.items}")


JsonValue = str | int | float | bool


class JsonCheck(WireModel):
    """The answer is one JSON object with `keys` (and only those with `exactKeys`); `values`
    pins some keys' values (strings compared like `exact`)."""

    type: Literal["json"]
    keys: list[str] = Field(..., min_length=1)
    exact_keys: bool = False
    values: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _values_are_keys(self) -> JsonCheck:
        unknown = sorted(set(self.values) - set(self.keys))
        if unknown:
            raise ValueError(f"values names keys not in keys: {unknown}")
        return self

    def score(self, answer: str) -> CheckResult:
        obj = scorers.json_object(answer)
        if obj is None:
            return CheckResult(False, f"{_excerpt(answer)} is not a JSON object")
        missing = [k for k in self.keys if k not in obj]
        extra = sorted(set(obj) - set(self.keys)) if self.exact_keys else []
        if missing or extra:
            return CheckResult(False, f"keys missing {missing}, unexpected {extra}")
        for key, want in self.values.items():
            if not _same_value(obj[key], want):
                return CheckResult(False, f"{key}={obj[key]!r}, wanted {want!r}")
        return CheckResult(True, "JSON object as asked")


def _same_value(got: object, want: JsonValue) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and scorers.exact_match(got, [want])
    if isinstance(want, bool) or isinstance(got, bool):  # bool is an int: true must not equal 1
        return got is want
    return isinstance(got, int | float) and got == want


class SentencesCheck(WireModel):
    """The answer has exactly `count` sentences."""

    type: Literal["sentences"]
    count: int = Field(..., ge=1)

    def score(self, answer: str) -> CheckResult:
        n = scorers.sentence_count(answer)
        return CheckResult(n == self.count, f"{n} sentences, wanted {self.count}")


class UppercaseCheck(WireModel):
    """Every letter of the answer is uppercase."""

    type: Literal["uppercase"]

    def score(self, answer: str) -> CheckResult:
        ok = scorers.is_uppercase(answer)
        return CheckResult(ok, "all uppercase" if ok else f"{_excerpt(answer)} is not uppercase")


class VarietyCheck(WireModel):
    """European Portuguese: the answer uses one of `expect`, none of `avoid` and, with
    `lexicon`, none of the pt-BR markers of amalia_variety.LEXICON anywhere."""

    type: Literal["variety"]
    expect: list[str] = Field(..., min_length=1, description="pt-PT forms; any one.")
    avoid: list[str] = Field(default_factory=list, description="Forms that fail the item.")
    lexicon: bool = True

    _one = field_validator("expect", "avoid", mode="before")(_one_or_more)

    def score(self, answer: str) -> CheckResult:
        avoided = scorers.mentioned(answer, self.avoid)
        if avoided:
            return CheckResult(False, f"uses {avoided[0]!r}")
        if self.lexicon:
            counts = count_markers(answer)
            if counts.pt_br:
                return CheckResult(False, f"pt-BR forms for {list(counts.pt_br_concepts)}")
        return _any_mentioned(answer, self.expect, "uses")


class AllCheck(WireModel):
    """Every check in `of` passes (e.g. uppercase and the right word)."""

    type: Literal["all"]
    of: list[Check] = Field(..., min_length=2)

    def score(self, answer: str) -> CheckResult:
        results = [check.score(answer) for check in self.of]
        failed = next((r for r in results if not r.passed), None)
        return failed or CheckResult(True, "; ".join(r.detail for r in results))


Check = Annotated[
    ExactCheck
    | ContainsCheck
    | RegexCheck
    | ChoiceCheck
    | WordsCheck
    | ListCheck
    | JsonCheck
    | SentencesCheck
    | UppercaseCheck
    | VarietyCheck
    | AllCheck,
    Field(discriminator="type"),
]
AllCheck.model_rebuild()
