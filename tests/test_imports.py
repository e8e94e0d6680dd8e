"""The package's modules import one another without a cycle, lazy imports inside functions included: each
concept can be read (and changed) from its own module down."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_ceag"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the hf_ceag modules it imports (top level or inside a function; `from .x import y` counts `x.y`
    when `y` is a module)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                prefix = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(prefix + ([node.module] if node.module else []))
                submodules = {f"{target}.{alias.name}" for alias in node.names} & paths.keys()
                deps |= submodules or {target}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path)
                elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                    stack.append((nxt, [*path, nxt]))
    return found


def test_the_walker_sees_a_lazy_import_cycle():
    graph = {"a": {"b"}, "b": set(), "c": {"a"}}
    assert cycles(graph) == []
    graph["b"] = {"c"}  # a function-level import in b of c closes a -> b -> c -> a
    assert cycles(graph) == [["a", "b", "c"]]
    assert "hf_ceag.models.saved_weights" in import_graph()["hf_ceag.models.rgb_input"]  # a lazy import is seen


def test_hf_ceag_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_trainer_module_holds_only_the_trainers_overrides():
    """Everything that is not a Trainer override lives with the concept that owns it (data.prepared,
    audit.trainer_audit, constraints.gather, ...): the module stays short enough to walk."""
    lines = (PACKAGE / "ceag_trainer.py").read_text().count("\n")
    assert lines <= 450, lines
