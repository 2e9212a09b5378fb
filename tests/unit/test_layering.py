"""Import boundaries: amalia_serve and amalia_operator never import each other; the ingress loads no torch.

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


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def imports_in_source(package_dir: Path) -> dict[str, set[str]]:
    """Top-level package of every absolute import in each file, wherever the statement sits."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(package_dir.parent))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("amalia_serve", "amalia_operator"), ("amalia_operator", "amalia_serve")],
)
def test_package_never_imports_the_other_when_every_import_statement_is_read(
    package: str, forbidden: str
) -> None:
    sources = imports_in_source(PACKAGE_DIRS[package])
    assert len(sources) > 10  # the scan found the package's files
    offenders = sorted(path for path, names in sources.items() if forbidden in names)
    assert not offenders, f"{package} files importing {forbidden}: {offenders}"


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


def test_operator_never_imports_serve_package_when_fully_loaded() -> None:
    loaded = imported_after("amalia_operator.handlers, amalia_operator.cli, amalia_operator.crd")
    assert "kopf" in loaded
    assert "amalia_serve" not in loaded and "ray" not in loaded and "torch" not in loaded


@pytest.mark.parametrize(
    "module", ["amalia_operator.rollout", "amalia_operator.serveconfig", "amalia_operator.patches"]
)
def test_pure_modules_import_no_kubernetes_when_loaded(module: str) -> None:
    loaded = imported_after(module)
    assert not {"kopf", "kubernetes", "aiohttp", "amalia_serve"} & loaded
