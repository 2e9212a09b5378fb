"""Fill the `amalia-serve plan` outputs docs/capacity.md quotes, so its numbers come from the tool.

Every block from a `<!-- plan: ARGS -->` line to the next `<!-- plan:end -->` line becomes a fenced
block holding `$ amalia-serve plan ARGS` and what that prints. `make manifests` runs it.

Usage: python scripts/capacity_docs.py [--check]   (--check writes nothing and exits 1 when stale)
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from amalia_serve.capacity_report import plan_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "capacity.md"
BLOCK = re.compile(
    r"^<!-- plan: (?P<args>.*?) -->\n.*?^<!-- plan:end -->$", re.MULTILINE | re.DOTALL
)


def filled(text: str) -> str:
    def block(match: re.Match[str]) -> str:
        args = match["args"]
        output = plan_text(shlex.split(args))
        fenced = f"```text\n$ amalia-serve plan {args}\n{output}\n```"
        return f"<!-- plan: {args} -->\n{fenced}\n<!-- plan:end -->"

    return BLOCK.sub(block, text)


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    wanted = filled(text)
    if wanted == text:
        return 0
    if "--check" in sys.argv[1:]:
        print(f"stale: {DOC.name} (run `python scripts/capacity_docs.py`)", file=sys.stderr)
        return 1
    DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
