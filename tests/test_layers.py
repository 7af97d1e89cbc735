"""The project's layering, read from the source with `ast` (nothing is imported):

- the library (`autoexplain/`) imports neither the orchestration (`autoexplain.flows`, `.tasks`) nor Prefect or
  Great Expectations, so a notebook or another orchestrator can use it alone;
- no import circles among the project's modules;
- no private name (`_x`) of one project module used by another;
- no file over the line limit.

Imports inside functions count as imports here. A late import still makes one module depend on the
other: it runs as soon as the function is called, and `autoexplain.identity` follows it into the
stage keys. In this project an import is deferred to skip a heavy third-party package on a path
that does not need it, never to hide a circle, so a circle through a late import fails as any
other. Imports under `if TYPE_CHECKING:` count too (`components` names the record types that
way): they are dependencies all the same, and a circle through them is one that a refactor must not
turn into a run-time one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from autoexplain.identity import SOURCE_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autoexplain", "schemas", "tasks", "flows", "tests", "bench")  # folders
MODULE_OF = {folder: package for package, folder in SOURCE_FOLDERS.items()}  # folder -> its package's name
ORCHESTRATION = ("autoexplain.flows", "autoexplain.tasks", "prefect", "prefect_dask", "great_expectations")
MAX_LINES = 450  # hard limit; the aim is about 400

# Pending, not allowed: autoexplain/llm.py imports autoexplain.llm_openai (which imports llm back)
# and autoexplain.registry (which imports llm) inside functions. That file is being reworked by
# another change (the LLM client); remove these entries when it lands.
PENDING_EDGES = {("autoexplain.llm", "autoexplain.llm_openai"), ("autoexplain.llm", "autoexplain.registry")}


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = (*MODULE_OF.get(parts[0], parts[0]).split("."), *parts[1:])
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = project_modules()


def owner(name: str) -> str | None:
    """The project module that a dotted name lives in (the longest module prefix), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def absolute(node: ast.ImportFrom, module: str) -> str:
    """The module an ImportFrom names, with a relative import resolved against `module`."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str, ast.AST]]:
    """(imported dotted name, the name bound or used, node) for every import in the module, at any depth."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, a.asname or a.name.split(".")[0], node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module)
            out += [(f"{base}.{a.name}", a.asname or a.name, node) for a in node.names]
    return out


def project_edges() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import mod` is an import of pkg.mod)."""
    edges = {}
    for module in MODULES:
        targets = set()
        for name, _, _ in imports(module):
            target = owner(name)
            if target and target != module:
                targets.add(target)
        edges[module] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(circle(sorted(component), edges))
    return found


def circle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A path from the component's first module back to itself, inside the component."""
    inside, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & inside):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def private_uses(module: str) -> list[str]:
    """`from m import _x` and `m._x`, where m is another project module, in one module."""
    found, bound = [], {}
    for name, as_name, node in imports(module):
        target = owner(name)
        if target is None:
            continue
        attr = name.rpartition(".")[2]
        if isinstance(node, ast.Import):  # `import a.b` binds a; `import a.b as c` binds a.b
            top = name.split(".")[0]
            bound[as_name] = top if as_name == top else name
        elif target == name:  # `from a import b`, b a module
            bound[as_name] = name
        elif attr.startswith("_") and not attr.startswith("__") and target != module:
            found.append(f"{module}: from {target} import {attr}")
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and bound.get(value.id) in MODULES:
                target = ".".join([bound[value.id], *reversed(chain)])
                if target in MODULES and target != module:
                    found.append(f"{module}: {target}.{node.attr}")
    return found


def test_the_library_imports_no_orchestration():
    """`autoexplain` runs without Prefect, Great Expectations, `flows` or `tasks`."""
    bad = [f"{m}: import {name}" for m, path in MODULES.items() if path.relative_to(ROOT).parts[0] == "autoexplain"
           for name, _, _ in imports(m) if any(name == o or name.startswith(o + ".") for o in ORCHESTRATION)]
    assert not bad, "the library imports the orchestration:\n" + "\n".join(bad)


def test_one_top_level_package_installed_from_these_folders():
    """pyproject installs `autoexplain` alone at the top level, its subpackages from the folders that
    `identity.SOURCE_FOLDERS` names (the stage keys' code identity reads the same mapping)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"autoexplain": "autoexplain", **SOURCE_FOLDERS}
    assert {p.split(".")[0] for p in setup["packages"]} == {"autoexplain"}
    assert sorted(setup["packages"]) == sorted(setup["package-dir"])


def test_no_import_circles():
    edges = project_edges()
    for a, b in PENDING_EDGES:
        assert b in edges[a], f"{a} no longer imports {b}: remove it from PENDING_EDGES"
        edges[a].discard(b)
    found = cycles(edges)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_circle_finder_finds_circles():
    """The check above can fail: a circle through three modules, and one of two, are found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(cycles(edges)) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_across_modules():
    """A name with a leading underscore belongs to its module: another module that needs it is
    using a real shared API (make it public) or code that belongs to the caller's owner (move it).
    Tests are exempt: a test module is its module's own white-box check (`contracts._fill`), and
    test modules share their helpers among themselves; neither is an API of the project's code."""
    bad = [line for m in MODULES if m.split(".")[0] != "tests" for line in private_uses(m)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_private_name_check_sees_both_spellings(monkeypatch, tmp_path):
    """The check above can fail: both `from m import _x` and `m._x` are reported."""
    user = tmp_path / "user.py"
    user.write_text("from autoexplain.explain import _hidden\nfrom autoexplain import scoring\n"
                    "import autoexplain.storage as st\nscoring._private(st._other, scoring.public)\n")
    monkeypatch.setitem(MODULES, "bench.user", user)
    assert sorted(private_uses("bench.user")) == ["bench.user: autoexplain.scoring._private",
                                                  "bench.user: autoexplain.storage._other",
                                                  "bench.user: from autoexplain.explain import _hidden"]


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along a real seam): {long}"
