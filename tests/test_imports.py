"""The package's import graph, read with `ast` (nothing is imported): no cycles among module-level
imports, no nanoseek import hidden inside a function (such imports are how cycles get papered over),
and every import going down the layers below."""
import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nanoseek"

# The parts of the package, each with the parts below it that it may import (its own part always); the layers
# of docs/ARCHITECTURE.md. Entry points (`cli` modules, the package `__init__`) sit on top and may import anything.
_BASE = {"utils", "config"}
_MODEL = _BASE | {"quant", "model"}
_INFER = _MODEL | {"fastpath", "interop", "data", "infer"}
_TRAIN = _MODEL | {"fastpath", "interop", "parallel", "train"}
LOWER = {
    "utils": set(),
    "config": {"utils"},
    "quant": _BASE,
    "model": _BASE | {"quant"},
    "fastpath": _MODEL,
    "interop": _MODEL,
    "parallel": _MODEL | {"scaling"},
    "data": _BASE,
    "tasks": _BASE | {"data"},
    "scaling": _BASE,
    "infer": _INFER,
    "eval": _INFER | {"tasks"},
    "train": _TRAIN,
    "pretrain": _TRAIN | {"data", "scaling"},
    "posttrain": _TRAIN | _INFER | {"tasks", "eval"},
    "recipes": _TRAIN | _INFER | {"tasks", "eval", "scaling", "pretrain", "posttrain"},
    "experiments": _TRAIN | _INFER | {"tasks", "eval", "scaling", "pretrain", "posttrain", "recipes"},
}
ENTRY_POINTS = {"nanoseek", "nanoseek.cli", "nanoseek.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module `name` is or is in. A package's `__init__` runs before its submodules, but that implicit
    import is not an edge: a package re-exporting its submodules is no cycle."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """nanoseek modules an import statement in `module` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: strip one part per dot (a package counts as its own first level)
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # `from x import y` is an import of x.y when y is a submodule (x is its package, as with `import x.y`)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return {t for n in names if (n == "nanoseek" or n.startswith("nanoseek.")) and (t := _resolve(n))}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, in_function: bool = False):
    """(import node, inside a function?) for every import statement; `if TYPE_CHECKING:` blocks never run."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        elif _is_type_checking(child):
            yield from _imports(ast.Module(body=child.orelse, type_ignores=[]), in_function)
        else:  # class bodies run at import time; function bodies do not
            yield from _imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _scan():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    in_functions: list[str] = []
    for module, path in MODULES.items():
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = _targets(node, module)
            if in_function:
                in_functions += [f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {t}" for t in sorted(targets)]
            else:
                graph[module] |= targets
    return graph, in_functions


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, and modules importing themselves (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):  # recursion depth is bounded by the package's size
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _part(module: str) -> str:
    """The part of the package a module belongs to: nanoseek.infer.engine -> infer, nanoseek.utils -> utils."""
    return module.split(".")[1]


def test_scanner_sees_relative_conditional_and_submodule_imports():
    tree = ast.parse(textwrap.dedent("""
        from . import engine
        from nanoseek.infer import sampling as s
        if X:
            import nanoseek.utils
        try:
            from ..config import ModelConfig
        except ImportError:
            pass
        def f():
            from nanoseek.model import transformer
        class C:
            def m(self):
                import nanoseek.cli
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import nanoseek.demo
    """))
    found = [(t, f) for node, f in _imports(tree) for t in sorted(_targets(node, "nanoseek.infer.generate"))]
    assert found == [("nanoseek.infer.engine", False), ("nanoseek.infer.sampling", False), ("nanoseek.utils", False),
                     ("nanoseek.config", False), ("nanoseek.model.transformer", True), ("nanoseek.cli", True)]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles():
    graph, _ = _scan()
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c)))
        for c in cycles)


def test_no_nanoseek_imports_inside_functions():
    _, in_functions = _scan()
    assert not in_functions, ("import nanoseek modules at the module's top (a cycle means a shared piece belongs "
                              "in a lower module):\n" + "\n".join(in_functions))


def test_imports_go_down_the_layers():
    graph, _ = _scan()
    parts = {_part(m) for m in MODULES if m not in ENTRY_POINTS}
    assert parts <= set(LOWER) | {"cli"}, f"give {parts - set(LOWER) - {'cli'}} a place in LOWER"
    # the package itself (its __init__ imports the model, tokenizer and generation) is above every part
    wrong = [f"{m} -> {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
             if m not in ENTRY_POINTS and not m.endswith(".cli")
             and (t == "nanoseek" or _part(t) != _part(m) and _part(t) not in LOWER[_part(m)])]
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)

