"""The package layering of docs/CONTRACTS.md ("Layers"), read from the source with `ast`.

Bottom to top: `common` (command plumbing and file writes, imports nothing of the project),
`shards` and `heads` (neither imports the other; heads imports nothing of the project, not even
`common`: it is a standalone library), `preprocess` and `models` (backbones, the model file, the
one model loader; neither imports the other), `eval`, `trainer` (it validates with eval's
verification), `bench`. A module may import its own package and the packages below it, at module
level or inside a function alike; there is no exception. Inside a package, imports form no cycle,
counting function-level imports (so no cycle is hidden by importing late).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = {
    "common": -1,
    "shards": 0,
    "heads": 0,
    "preprocess": 1,
    "models": 1,
    "eval": 2,
    "trainer": 3,
    "bench": 4,
}
# packages that import nothing else of the project
STANDALONE = {"heads", "common"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int, str]]:
    """(imported name, line, kind) for every import statement of a module; kind is "module" (runs
    at import time), "function" (runs when called) or "typing" (under `if TYPE_CHECKING:`, never)."""
    out: list[tuple[str, int, str]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, kind) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                out.extend((f"{base}.{a.name}", child.lineno, kind) for a in child.names)
                out.append((base, child.lineno, kind))
            elif _type_checking_block(child):
                visit(child, "typing")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "typing" if kind == "typing" else "function")
            else:
                visit(child, kind)

    visit(ast.parse(source), "module")
    return out


def project_modules() -> dict[str, Path]:
    found = {}
    for pkg in RANK:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[module_name(path)] = path
    return found


def violations(module: str, targets: list[str]) -> list[str]:
    """The imported names that break the layering (targets: dotted names it imports)."""
    src_pkg = module.split(".")[0]
    bad = []
    for target in targets:
        pkg = target.split(".")[0]
        if pkg not in RANK or pkg == src_pkg:
            continue
        if RANK[pkg] < RANK[src_pkg] and src_pkg not in STANDALONE:
            continue
        bad.append(target)
    return bad


def import_graph() -> dict[str, dict[str, set[str]]]:
    """module -> {project module it imports -> the kinds of those imports}, names resolved to modules."""
    mods = project_modules()
    graph: dict[str, dict[str, set[str]]] = {}
    for mod, path in mods.items():
        edges: dict[str, set[str]] = {}
        for name, _, kind in imports_of(path.read_text(), mod, path.name == "__init__.py"):
            target = name
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != mod:
                edges.setdefault(target, set()).add(kind)
        graph[mod] = edges
    return graph


def test_every_import_respects_the_layers():
    mods = project_modules()
    bad = []
    for mod, path in mods.items():
        names = [n for n, _, _ in imports_of(path.read_text(), mod, path.name == "__init__.py")]
        bad += [f"{path.relative_to(ROOT)} imports {t}" for t in violations(mod, names)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_and_catches_a_violation():
    graph = import_graph()
    assert "eval.verification.plots" in graph["eval.lfw"]  # a function-level import, seen
    assert "eval.verification.validation" in graph["trainer.main"]  # trainer sits above eval
    src = "import torch\ndef f():\n    from trainer.checkpoint import load_checkpoint\n"
    names = [n for n, _, _ in imports_of(src, "eval.lfw")]
    assert violations("eval.lfw", names) == ["trainer.checkpoint.load_checkpoint", "trainer.checkpoint"]
    assert violations("models.load", ["preprocess.align"]) == ["preprocess.align"]  # the same layer
    assert violations("heads.core", ["common.cli"]) == ["common.cli"]
    assert violations("shards.loader", ["heads"]) == ["heads"]
    assert violations("eval.lfw", ["models.load", "shards.manifest"]) == []


def _cycles(graph: dict[str, dict[str, set[str]]], kinds: set[str]) -> list[str]:
    """Import cycles among the modules of one package, over imports of these kinds."""

    def edges(mod: str) -> list[str]:
        return [t for t, used in graph[mod].items() if t.split(".")[0] == mod.split(".")[0] and used & kinds]

    found, state = [], {}

    def walk(mod: str, stack: list[str]) -> None:
        state[mod] = 1
        stack.append(mod)
        for nxt in edges(mod):
            if state.get(nxt) == 1:
                found.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            walk(mod, [])
    return found


def test_no_import_cycle_inside_a_package():
    cycles = _cycles(import_graph(), {"module"})
    assert not cycles, "; ".join(cycles)


def test_no_function_level_import_closes_a_cycle():
    cycles = _cycles(import_graph(), {"module", "function"})
    assert not cycles, "; ".join(cycles)


def test_no_annotation_only_import_closes_a_cycle():
    """Not even through `if TYPE_CHECKING:` (trainer.hooks once named the engine's Trainer so)."""
    cycles = _cycles(import_graph(), {"module", "function", "typing"})
    assert not cycles, "; ".join(cycles)


def test_models_imports_only_common():
    """models/ sits beside preprocess/ with nothing of the project under it but common/ (so eval/,
    the trainer and export read models with torch/onnxruntime and nothing else)."""
    graph = import_graph()
    bad = [
        f"{mod} imports {target}"
        for mod, edges in graph.items()
        if mod.split(".")[0] == "models"
        for target in edges
        if target.split(".")[0] not in ("models", "common")
    ]
    assert not bad, "\n".join(bad)
