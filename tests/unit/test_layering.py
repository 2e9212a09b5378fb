"""Import boundaries: amalia_serve and amalia_operator never import each other; the ingress loads no torch.

What both need, the pt-PT/pt-BR marker lexicon that the evaluation step and the ingress's shadow traffic
score answers with, is a third package, amalia_variety (one copy, not two that drift apart): standard
library only, and it imports neither of the others.

Two checks, because each misses what the other sees. The source scan reads every import statement of a
package, those inside functions too (`amalia-serve` once reached the operator from a function body, which
importing the module never shows). The subprocess checks what a process really loads, however indirectly.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"amalia_serve": ROOT / "serve", "amalia_operator": ROOT / "operators"}
SHARED = "amalia_variety"


def modules_after(module: str) -> set[str]:
    """Every module a fresh interpreter holds after importing `module` (comma-separated names work)."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def imported_after(module: str) -> set[str]:
    return {name.split(".")[0] for name in modules_after(module)}


def imports_in_source(package_dir: Path, depth: int = 1) -> dict[str, set[str]]:
    """The first `depth` parts of every absolute import in each file, wherever the statement sits."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names |= {".".join(alias.name.split(".")[:depth]) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(".".join(node.module.split(".")[:depth]))
        found[str(path.relative_to(package_dir.parent))] = names
    return found


def test_serve_never_imports_the_operator_when_every_import_statement_is_read() -> None:
    sources = imports_in_source(PACKAGE_DIRS["amalia_serve"])
    assert len(sources) > 10  # the scan found the package's files
    offenders = sorted(path for path, names in sources.items() if "amalia_operator" in names)
    assert not offenders, f"amalia_serve files importing amalia_operator: {offenders}"


def test_operator_never_imports_serve_when_every_import_statement_is_read() -> None:
    sources = imports_in_source(PACKAGE_DIRS["amalia_operator"])
    assert len(sources) > 10
    offenders = sorted(path for path, names in sources.items() if "amalia_serve" in names)
    assert not offenders, f"amalia_operator files importing amalia_serve: {offenders}"
    assert any(SHARED in names for names in sources.values())  # the lexicon comes from the shared package


def test_source_scan_sees_imports_in_function_bodies_when_reading_a_file(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(
        "import os\n\ndef f():\n    from amalia_operator.cli import main\n    import ray.serve as s\n"
        "    from . import sibling\n    return main, s, sibling\n"
    )
    assert imports_in_source(package) == {"pkg/mod.py": {"os", "amalia_operator", "ray"}}


def test_ingress_loads_no_torch_vllm_or_operator_when_imported() -> None:
    loaded = imported_after("amalia_serve.ingress")
    assert "fastapi" in loaded and "ray" in loaded  # it did load what the ingress needs
    assert not {"torch", "vllm", "amalia_operator"} & loaded, sorted(
        {"torch", "vllm", "amalia_operator"} & loaded
    )


def test_operator_loads_no_serve_module_when_fully_loaded() -> None:
    modules = modules_after(
        "amalia_operator.handlers, amalia_operator.cli, amalia_operator.crd, "
        "amalia_operator.evaluation.checks, amalia_operator.evaluation.runner"
    )
    loaded = {name.split(".")[0] for name in modules}
    assert "kopf" in loaded
    assert "amalia_serve" not in loaded and SHARED in loaded
    heavy = {"ray", "torch", "vllm", "fastapi"} & loaded
    assert not heavy, sorted(heavy)


@pytest.mark.parametrize(
    "module", ["amalia_operator.rollout", "amalia_operator.serveconfig", "amalia_operator.patches"]
)
def test_pure_modules_import_no_kubernetes_when_loaded(module: str) -> None:
    modules = modules_after(module)
    assert not {"kopf", "kubernetes", "aiohttp"} & {name.split(".")[0] for name in modules}
    assert "amalia_serve" not in {name.split(".")[0] for name in modules}


def test_shared_lexicon_loads_no_third_party_package_when_imported() -> None:
    modules = modules_after(SHARED)
    packages = {name.split(".")[0] for name in modules}
    third_party = {"pydantic", "yaml", "ray", "torch", "vllm"} & packages
    assert not third_party, sorted(third_party)
    assert not {"amalia_serve", "amalia_operator"} & packages
