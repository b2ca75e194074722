"""The import graph keeps its layers: shared contracts below, stages above them, the pipeline and the CLI on top.

Parsed from the source (ast), so lazy imports inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "synthpert"

# Each stage is a group of modules that may import one another; no group imports another group, with one
# exception: evaluation writes its report.
STAGES = {
    "data": {"data"},  # builds datasets; dataset.py (shared) reads PerturbQA and built datasets for every stage
    "generate": {"generate"},
    "judge": {"judge"},
    "train": {"train", "train_data", "loss_mask"},
    "rl": {"rl", "rewards"},
    "tiny": {"tiny"},
    "merge": {"merge"},
    "evaluate": {"evaluate", "evaluate_ray"},
    "publish": {"publish"},
    "report": {"report", "verdict"},
    "serve": {"serve"},
    "predict": {"predict"},
    "screen": {"screen", "screen_de", "screen_synth"},  # a user's .h5ad screen to PerturbQA-format CSVs
}
ALLOWED_BETWEEN_STAGES = {("evaluate", "report")}
# What stages share: contracts (answer format, records, configs, runs, prompts, hashing) and the engines
# they run models through (client.py for chat APIs, inference.py/backends for local models), data and
# evidence. None of them may import a stage, the pipeline or the CLI.
SHARED = {
    "__init__", "errors", "resources", "answer", "schema", "config", "cells", "prompting", "runs", "tokenizer",
    "chat", "dataset", "fetch", "evidence", "lookup", "metrics",
    "baselines", "decision", "offline", "inference", "backends", "tracking", "checkpoints", "models", "ceiling",
    "run_folder", "model_check", "sampling", "precision", "metric_table",
}
TOP = {"pipeline"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every synthpert module ``path`` imports, as dotted names (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "synthpert"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "synthpert":
                continue
            # `from . import data` names a module: an import of that module (the package is the one already
            # being imported); `from .config import load_section` imports the package itself
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if (PKG.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists()
                          or (PKG.parent / Path(*f"{target}.{alias.name}".split("."))).is_dir()]
            out.update(submodules)
            if len(submodules) < len(node.names):
                out.add(target)
    return out


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _top(module: str) -> str:
    """The layer unit of a module: its first name under synthpert (synthpert.config.train -> config)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _stage_of(module: str) -> str | None:
    return next((s for s, members in STAGES.items() if _top(module) in members), None)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if _top(m) not in SHARED | TOP | {"cli"} and _stage_of(m) is None)
    assert not unplaced, f"place these modules in a layer in tests/test_layering.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _stage_of(m)))
def test_a_stage_imports_no_other_stage(module):
    here = _stage_of(module)
    bad = sorted(t for t in GRAPH[module] if (s := _stage_of(t)) and s != here and (here, s) not in
                 ALLOWED_BETWEEN_STAGES)
    assert not bad, f"{module} (stage {here}) imports other stages: {bad}; move what they share down"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _top(m) in SHARED))
def test_shared_modules_import_no_stage_pipeline_or_cli(module):
    bad = sorted(t for t in GRAPH[module] if _stage_of(t) or _top(t) in TOP | {"cli"})
    assert not bad, f"shared module {module} imports {bad}"


def test_only_the_cli_imports_the_cli():
    bad = sorted(m for m, deps in GRAPH.items() if _top(m) != "cli" and any(_top(t) == "cli" for t in deps))
    assert not bad, f"modules outside synthpert/cli import it: {bad}"


def test_report_is_imported_only_by_evaluation_and_the_cli():
    importers = sorted(m for m, deps in GRAPH.items() if any(_top(t) == "report" for t in deps))
    assert set(importers) <= {"synthpert.evaluate"} | {m for m in GRAPH if _top(m) == "cli"}, importers
    assert "synthpert.evaluate" in importers


def test_the_graph_is_read():
    """The parser resolves relative imports (else every check above would pass vacuously)."""
    assert "synthpert.report" in GRAPH["synthpert.evaluate"]
    assert "synthpert.config.train" in GRAPH["synthpert.train"]
    assert "synthpert.rewards" in GRAPH["synthpert.rl"]
    assert "synthpert.cli.run" in GRAPH["synthpert.cli.main"]
    assert "synthpert.pipeline" in GRAPH["synthpert.cli.run"]


# The class and rating vocabularies live in answer.py alone. "up" / "down" are also a DE screen's fold-change
# directions (screen counts, the synthetic screen's truth), so only the screen modules may spell those two.
VOCABULARY = {"upregulated", "downregulated", "not differentially expressed", "not_de", "not DE",
              "excellent", "good", "average", "bad", "terrible"}
DIRECTIONS = {"up", "down"}
SCREEN_MODULES = {"screen.py", "screen_synth.py", "screen_de.py", "cli/screen.py"}


def spelled_vocabulary(source: str, name: str) -> list[str]:
    """String constants in ``source`` (module ``name``, relative to the package) that spell a class or rating."""
    words = VOCABULARY | (set() if name in SCREEN_MODULES else DIRECTIONS)
    return [f"{name}:{n.lineno} {n.value!r}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in words]


def test_only_answer_py_spells_the_labels_and_the_ratings():
    found = [hit for path in sorted(PKG.rglob("*.py")) if path.name != "answer.py"
             for hit in spelled_vocabulary(path.read_text(), path.relative_to(PKG).as_posix())]
    assert found == []
    # the check sees a hand-spelled key, and a rating inside a Literal
    assert spelled_vocabulary('probs.get("not_de")', "report.py") == ["report.py:1 'not_de'"]
    assert spelled_vocabulary('x: Literal["good", "bad"]', "config/judge.py") == [
        "config/judge.py:1 'good'", "config/judge.py:1 'bad'"]
    assert spelled_vocabulary('totals = {"up": 0}', "screen.py") == []


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import one another, directly or round a loop (Tarjan's strongly connected
    components), lazy imports included: each group is a circle."""
    edges = {m: sorted(t for t in deps if t in graph and t != m) for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_no_module_imports_itself_back_round_a_circle():
    assert import_circles(GRAPH) == []
    # the check sees a circle through a lazy import, as schema -> config -> config.generate -> schema was
    injected = {**GRAPH, "synthpert.answer": GRAPH["synthpert.answer"] | {"synthpert.metric_table"}}
    assert import_circles(injected) == [["synthpert.answer", "synthpert.metric_table"]]
