"""European vs Brazilian Portuguese: count each variety's markers in a text.

A marker is a form one variety uses where the other uses a different one (pt-PT `autocarro`,
pt-BR `ônibus`). The lexicon is written to be fair to pt-PT: a word that is also correct European
Portuguese in another sense only counts as pt-BR in contexts where it cannot have that sense.

- `fato` is pt-PT for "suit" (`fato de banho`, `de fato e gravata`): only the pt-BR idioms for
  "fact" count (`De fato, ...`, `pelo fato de ser`, `é fato que`).
- `trem` is pt-PT in `trem de aterragem` and `trem de cozinha`; those do not count.
- `tela` is a painter's canvas in pt-PT: only a device's screen (`tela do computador`) counts.
- `celular` is an adjective in pt-PT (`membrana celular`): only the noun (`o celular`) counts.
- `moça` is also European Portuguese, so it is no marker at all; `rapariga` is pt-PT evidence.
- estar + gerund (`está fazendo`) is pt-BR; pt-PT says estar a + infinitive (`está a fazer`).
  Adjectives and words that merely end like a gerund (`está lindo`, `estava quando`) do not count.

Matching is case-insensitive on NFC text; accents are optional where dropping one cannot turn
the form into another word (`onibus` is still pt-BR), and required where it can (`é fato que`
but not `e fato`, since `e` is "and").

Two users, one lexicon: the operator's evaluation scores golden-set answers with it, and the
ingress scores shadow answers (amalia_serve.shadow). It is the one module of amalia_serve that
amalia_operator imports, so it stays pure: re and unicodedata only (tests/unit/test_layering.py).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ESTAR = (
    r"(?:estou|est[áa]s?|estamos|est[ãa]o|estava|estavas|est[áa]vamos|estavam|estive|esteve"
    r"|estiveram|estar|estiver|estivesse)"
)
# Words ending in -ando/-endo/-indo that are not gerunds, or not the pt-BR progressive.
_NOT_GERUNDS = r"(?!(?:quando|lindo|brando|estupendo|tremendo|horrendo|infindo)\b)"
_DEVICE = (
    r"(?:computador|telem[óo]vel|celular|telefone|televis[ãa]o|port[áa]til|monitor|smartphone"
    r"|tablet)"
)
_ARTICLE = r"(?:o|os|um|uns|meu|meus|teu|teus|seu|seus|do|dos|no|nos|pelo|ao|esse|este|nosso)"


@dataclass(frozen=True)
class Marker:
    concept: str
    variety: str  # "pt-PT" or "pt-BR"
    pattern: re.Pattern[str]


def _markers(concept: str, pt_pt: list[str], pt_br: list[str]) -> list[Marker]:
    def compile_all(variety: str, patterns: list[str]) -> list[Marker]:
        return [
            Marker(concept, variety, re.compile(p, re.IGNORECASE | re.MULTILINE)) for p in patterns
        ]

    return compile_all("pt-PT", pt_pt) + compile_all("pt-BR", pt_br)


LEXICON: tuple[Marker, ...] = tuple(
    _markers("bus", [r"\bautocarros?\b"], [r"\b[ôo]nibus\b"])
    + _markers("train", [r"\bcomboios?\b"], [r"\btre(?:m|ns)\b(?!\s+de\s+(?:aterragem|cozinha)\b)"])
    + _markers(
        "fact",
        [r"\bfactos?\b"],
        [
            r"(?:^|[.!?]\s+)de fato\s*,",
            r"\b(?:o|pelo|do|no|ao) fato de (?:ser|ter|estar|haver|existir|não|nao)\b",
            r"\b(?:é|foi|era) fato que\b",
            r"\bde fato (?:é|foi|era|será|está|estava|existe|existem|há|tem|tinha)\b",
        ],
    )
    + _markers(
        "progressive",
        [rf"\b{_ESTAR}\s+a\s+\w+(?:ar|er|ir|[oô]r)\b"],
        [rf"\b{_ESTAR}\s+{_NOT_GERUNDS}\w+(?:ando|endo|indo)\b"],
    )
    + _markers("breakfast", [r"\bpequenos?[\s-]almo[çc]os?\b"], [r"\bcaf[ée] da manh[ãa]\b"])
    + _markers(
        "screen",
        [r"\becr[ãa]s?\b"],
        [rf"\btelas?\s+d[oa]s?\s+{_DEVICE}\b", r"\btela\s+(?:inicial|cheia|sens[íi]vel)\b"],
    )
    + _markers(
        "mobile phone",
        [r"\btelem[óo]ve(?:l|is)\b"],
        [rf"\b{_ARTICLE}\s+celular(?:es)?\b", r"\btelefones?\s+celular(?:es)?\b"],
    )
    + _markers("bathroom", [r"\bcasas?[\s-]de[\s-]banho\b"], [r"\bbanheiros?\b"])
    + _markers("fridge", [r"\bfrigor[íi]ficos?\b"], [r"\bgeladeiras?\b"])
    + _markers("girl", [r"\braparigas?\b"], [])
    + _markers(
        "contact",
        [r"\bcontact(?:o|os|ar|e|em|ou|ado|ada|ados|adas)\b"],
        [r"\bcontat(?:o|os|ar|e|em|ou|ado|ada|ados|adas)\b"],
    )
    + _markers("team", [r"\bequipas?\b"], [r"\bequipes?\b"])
    + _markers("crosswalk", [r"\bpassadeiras?\b"], [r"\bfaixas?\s+de\s+pedestres?\b"])
)


@dataclass(frozen=True)
class VarietyCounts:
    """Markers found in one text: how many occurrences of each variety, and of which concepts."""

    pt_pt: int
    pt_br: int
    pt_pt_concepts: tuple[str, ...]
    pt_br_concepts: tuple[str, ...]

    @property
    def score(self) -> float | None:
        """Share of markers that are pt-PT (1.0 all pt-PT, 0.0 all pt-BR); None without markers."""
        total = self.pt_pt + self.pt_br
        return self.pt_pt / total if total else None


def count_markers(text: str, lexicon: tuple[Marker, ...] = LEXICON) -> VarietyCounts:
    nfc = unicodedata.normalize("NFC", text)
    found: dict[str, list[tuple[str, int]]] = {"pt-PT": [], "pt-BR": []}
    for marker in lexicon:
        hits = len(marker.pattern.findall(nfc))
        if hits:
            found[marker.variety].append((marker.concept, hits))
    return VarietyCounts(
        pt_pt=sum(n for _, n in found["pt-PT"]),
        pt_br=sum(n for _, n in found["pt-BR"]),
        pt_pt_concepts=tuple(dict.fromkeys(c for c, _ in found["pt-PT"])),
        pt_br_concepts=tuple(dict.fromkeys(c for c, _ in found["pt-BR"])),
    )
