"""The package's layout is its design: which side imports what (read from the source, statically, and checked at
run time), and the README's Layout section lists exactly what `ls qllm/` shows.

Rules (each subpackage's __init__ docstring states its own):
1. the orchestrator side (what `python -m qllm.run`, `qllm cache`, `python -m qllm.report` and planning import when
   they start) imports no torch, transformers, llmcompressor, compressed-tensors, accelerate, deepspeed or vllm;
2. qllm.measure, qllm.store, qllm.tasks and qllm.sources import nothing from qllm.stages (not even inside a function);
3. qllm.report imports from qllm only qllm.report, qllm.store and qllm.names: it reads the store.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "qllm"
HEAVY = {"torch", "transformers", "llmcompressor", "compressed_tensors", "accelerate", "deepspeed", "vllm"}
ORCHESTRATOR = ("qllm.run", "qllm.cache", "qllm.__main__", "qllm.report.__main__", "qllm.planning")
NO_STAGES = ("qllm.measure", "qllm.store", "qllm.tasks", "qllm.sources")
REPORT_MAY_IMPORT = ("qllm.report", "qllm.store", "qllm.names")


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of the package under `root` (its parent is the import root)."""
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


class _Imports(ast.NodeVisitor):
    """Every import of a module: (target, at module level?). Imports under `if TYPE_CHECKING:` never run."""

    def __init__(self, name: str, is_package: bool, known: set[str]):
        self.package = name if is_package else name.rpartition(".")[0]
        self.known, self.found, self.depth = known, [], 0

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(a.name, self.depth == 0) for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = self._absolute(node)
        for a in node.names:  # `from . import x`: x may be a submodule
            sub = f"{target}.{a.name}"
            self.found.append((sub if sub in self.known else target, self.depth == 0))

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def import_graph(root: Path) -> dict[str, list[tuple[str, bool]]]:
    mods = modules(root)
    graph = {}
    for name, f in mods.items():
        v = _Imports(name, f.name == "__init__.py", set(mods))
        v.visit(ast.parse(f.read_text(), str(f)))
        graph[name] = v.found
    return graph


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    out = []
    # 1. module-level closure of the orchestrator's entry points
    seen: dict[str, str] = {}
    todo = [(m, m) for m in ORCHESTRATOR]
    while todo:
        mod, via = todo.pop()
        for m in _with_parents(mod):
            if m in seen or m not in graph:
                continue
            seen[m] = via
            for target, top in graph[m]:
                if not top:
                    continue
                if target.split(".")[0] in HEAVY:
                    out.append(f"rule 1: {m} imports {target} at module level (reached from {seen[m]})")
                elif target.startswith("qllm"):
                    todo.append((target, seen[m]))
    # 2. and 3., at any depth
    for m, imports in graph.items():
        for target, _ in imports:
            if m.startswith(NO_STAGES) and target.startswith("qllm.stages"):
                out.append(f"rule 2: {m} imports {target}")
            if m.startswith("qllm.report") and target.startswith("qllm") and not target.startswith(REPORT_MAY_IMPORT):
                out.append(f"rule 3: {m} imports {target}")
    return sorted(set(out))


def test_import_rules_hold():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("module, line, rule", [
    ("qllm/store/cache.py", "from ..stages import runner\n", "rule 2: qllm.store.cache imports qllm.stages.runner"),
    ("qllm/measure/sizes.py", "def f():\n    from qllm.stages.backends import hf\n",
     "rule 2: qllm.measure.sizes imports qllm.stages.backends.hf"),
    ("qllm/report/tables.py", "from ..sources import models\n", "rule 3: qllm.report.tables imports qllm.sources.models"),
    ("qllm/methods.py", "import torch\n", "rule 1: qllm.methods imports torch at module level"),
    # reached indirectly: run -> planning -> tasks.spec
    ("qllm/tasks/spec.py", "from transformers import AutoTokenizer\n", "rule 1: qllm.tasks.spec imports transformers"),
])
def test_a_broken_rule_is_caught(tmp_path, module, line, rule):
    copy = tmp_path / "qllm"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / module
    text = target.read_text()
    cut = text.index("\n\n", text.index('"""', 3)) + 2  # after the module docstring
    target.write_text(text[:cut] + line + text[cut:])
    found = violations(copy)
    assert any(v.startswith(rule) for v in found), found


def test_a_lazy_heavy_import_is_allowed_but_a_module_level_one_is_not():
    graph = import_graph(PACKAGE)
    lazy = [t for t, top in graph["qllm.stages.quantize"] if t.split(".")[0] in HEAVY]
    assert lazy and not [t for t, top in graph["qllm.stages.quantize"] if top and t.split(".")[0] in HEAVY]


def test_orchestrator_starts_and_plans_without_torch(data_dir):
    """At run time too: importing the entry points and planning the default cell loads no torch."""
    code = ("import sys; import qllm.run, qllm.cache, qllm.report.__main__; from qllm.planning import compose_cell; "
            f"compose_cell(['data_dir={data_dir}']); "
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _readme_layout() -> set[str]:
    """The entries of qllm/ named in the README's Layout section (lines `  name.py` / `  name/` under `qllm/`)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Layout"):]
    block = section[section.index("```") + 3:]
    block = block[: block.index("```")]
    inside, names = False, set()
    for line in block.splitlines():
        if re.match(r"^\S", line):
            inside = line.startswith("qllm/")
            continue
        m = re.match(r"^  (\S+?(?:\.py|/))\s", line + " ")
        if inside and m:
            names.add(m.group(1))
    return names


def test_readme_layout_lists_the_package():
    actual = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
              if p.name != "__pycache__" and (p.is_dir() or p.suffix == ".py")}
    assert _readme_layout() == actual
