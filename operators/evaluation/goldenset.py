"""Golden-set files: the format (a versioned YAML document), its loader, and where sets are found.

A set is named by its file name without `.yaml`; the file's `name` must match, so a reference in a
ModelRollout names exactly one file. The sets shipped with the operator live in `goldensets/` next
to this module; teams add theirs in directories listed in AMALIA_GOLDEN_SET_DIRS (a ConfigMap
mounted into the operator pod; docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from amalia_operator.evaluation.checks import Check
from amalia_operator.models import SLUG_PATTERN, GoldenSetInfo, WireModel

DEFAULT_MAX_TOKENS = 128
PACKAGED_DIR = Path(__file__).parent / "goldensets"
# Directories of team sets, separated like PATH; a missing directory is skipped (no ConfigMap).
GOLDEN_SET_DIRS = [
    Path(p) for p in os.getenv("AMALIA_GOLDEN_SET_DIRS", "/etc/amalia/goldensets").split(os.pathsep)
    if p
]  # fmt: skip
DEFAULT_DIRS = (PACKAGED_DIR, *GOLDEN_SET_DIRS)


class GoldenSetError(ValueError):
    """A golden set that cannot be used: unreadable, malformed, or not found."""


class Message(WireModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., min_length=1)


class Item(WireModel):
    id: str = Field(..., pattern=SLUG_PATTERN, description="Unique within the set.")
    category: str = Field(..., pattern=SLUG_PATTERN, description="Scores are also per category.")
    prompt: str | None = Field(None, min_length=1, description="One user message.")
    messages: list[Message] | None = Field(None, min_length=1, description="Or a conversation.")
    max_tokens: int | None = Field(None, ge=1, le=4096, description="Overrides the set's.")
    check: Check
    good_answers: list[str] = Field(
        default_factory=list, description="Answers that must pass `check`; checked on load."
    )
    bad_answers: list[str] = Field(
        default_factory=list, description="Answers that must fail `check`; checked on load."
    )

    @model_validator(mode="after")
    def _one_input(self) -> Item:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("an item has exactly one of prompt and messages")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return self

    @model_validator(mode="after")
    def _examples_score_as_declared(self) -> Item:
        """A check that fails its own good answer (or passes a bad one) is an authoring mistake;
        finding it on load beats finding it in a rolled-back rollout."""
        for answer, wanted in [(a, True) for a in self.good_answers] + [
            (a, False) for a in self.bad_answers
        ]:
            result = self.check.score(answer)
            if result.passed != wanted:
                verb = "fails" if wanted else "passes"
                raise ValueError(f"its check {verb} the {'good' if wanted else 'bad'} answer "
                                 f"{answer!r} ({result.detail})")  # fmt: skip
        return self


class GoldenSet(WireModel):
    api_version: Literal["evaluation.amalia.pt/v1"]
    kind: Literal["GoldenSet"]
    name: str = Field(..., pattern=SLUG_PATTERN)
    description: str = ""
    system: str | None = Field(
        None, min_length=1, description="System message put before every item's prompt."
    )
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=4096)
    items: list[Item] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> GoldenSet:
        counts = Counter(i.id for i in self.items)
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"duplicate item ids: {duplicates}")
        return self

    def chat(self, item: Item) -> list[dict[str, str]]:
        """The messages to send for `item`: the set's system message (unless the item brings
        its own), then the item's conversation."""
        turns = item.messages or [Message(role="user", content=item.prompt or "")]
        system = [] if self.system is None or turns[0].role == "system" else [
            {"role": "system", "content": self.system}
        ]  # fmt: skip
        return system + [{"role": m.role, "content": m.content} for m in turns]

    def max_tokens_for(self, item: Item) -> int:
        return item.max_tokens or self.max_tokens


def _where(raw: Any, loc: tuple[int | str, ...]) -> str:
    """`item 'capital' (items[3]) check.expected` for an error location inside an item."""
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
        items = raw.get("items") if isinstance(raw, dict) else None
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        item_id = item.get("id") if isinstance(item, dict) else None
        rest = ".".join(str(p) for p in loc[2:])
        label = f"item {item_id!r} (items[{loc[1]}])" if item_id else f"items[{loc[1]}]"
        return f"{label} {rest}".strip()
    return ".".join(str(p) for p in loc) or "document"


def parse_golden_set(text: str, source: str) -> GoldenSet:
    """Validates one golden-set document; `source` names it in every error."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GoldenSetError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise GoldenSetError(f"{source}: expected a mapping with apiVersion, kind, name, items")
    try:
        return GoldenSet.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{_where(raw, e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise GoldenSetError(f"{source}: " + "; ".join(problems)) from None


def load_golden_set(path: Path) -> GoldenSet:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenSetError(f"{path}: cannot read: {exc}") from None
    golden = parse_golden_set(text, str(path))
    if golden.name != path.stem:
        raise GoldenSetError(f"{path}: name {golden.name!r} must match the file name {path.stem!r}")
    return golden


def find_golden_sets(dirs: Sequence[Path]) -> dict[str, Path]:
    """Every `*.yaml` file in `dirs`, by set name. Hidden entries (a mounted ConfigMap's `..data`
    links) are skipped; the same name in two directories is an error, not a silent override."""
    found: dict[str, Path] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.yaml")):
            if path.name.startswith("."):
                continue
            if path.stem in found:
                raise GoldenSetError(
                    f"golden set {path.stem!r} is defined twice: {found[path.stem]} and {path}"
                )
            found[path.stem] = path
    return found


def load_golden_sets(names: Sequence[str], dirs: Sequence[Path] = DEFAULT_DIRS) -> list[GoldenSet]:
    """The named sets, in order; GoldenSetError names the first one that is missing or bad."""
    return [golden for golden, _ in _load_named(names, dirs)]


def load_named_golden_set(name: str, dirs: Sequence[Path] = DEFAULT_DIRS) -> tuple[GoldenSet, str]:
    """One set by name, with a description of where it was found: `shipped` for the operator's
    own sets, else its file."""
    ((golden, path),) = _load_named([name], dirs)
    return golden, "shipped" if path.parent == PACKAGED_DIR else str(path)


def _load_named(names: Sequence[str], dirs: Sequence[Path]) -> list[tuple[GoldenSet, Path]]:
    if not names:
        raise GoldenSetError("no golden set named")
    available = find_golden_sets(dirs)
    missing = [n for n in names if n not in available]
    if missing:
        raise GoldenSetError(
            f"golden sets not found: {missing}; available: {sorted(available)} "
            f"(searched {[str(d) for d in dirs]})"
        )
    return [(load_golden_set(available[n]), available[n]) for n in dict.fromkeys(names)]


def golden_set_info(golden: GoldenSet, source: str) -> GoldenSetInfo:
    """Name, source, size and a digest (12 hex digits of SHA-256 over the parsed set, so
    formatting and comments do not change it, and any change of an item does)."""
    canonical = golden.model_dump_json(by_alias=True).encode()
    return GoldenSetInfo(
        name=golden.name,
        source=source,
        items=len(golden.items),
        digest=hashlib.sha256(canonical).hexdigest()[:12],
    )
