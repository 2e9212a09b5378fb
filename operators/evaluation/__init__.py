"""The evaluation step's parts: golden sets (format, loader, the sets shipped in `goldensets/`),
scorers and checks, the verdict (judge.py), all pure; and the run against the ingress
(`amalia_operator.evaluation.runner`, aiohttp), which is not imported here so that the pure parts
load without an HTTP client. docs/evaluation.md describes the format, the scoring and the
thresholds.
"""

from amalia_operator.evaluation.goldenset import GoldenSet, GoldenSetError, load_golden_sets
from amalia_operator.evaluation.judge import Judgement, Verdict, judge
from amalia_operator.evaluation.result import EvaluationResult

__all__ = [
    "EvaluationResult",
    "GoldenSet",
    "GoldenSetError",
    "Judgement",
    "Verdict",
    "judge",
    "load_golden_sets",
]
