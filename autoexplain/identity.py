"""Code identity: the hash of the project source that a stage runs, derived from its imports.

A stage names its entry point, a function (`code_identity(run_explain)`) or a string
`"autoexplain.layer:run_explain"` (`"autoexplain.view"` for a whole module). From there the
analysis (`ast`, nothing is imported) follows what the entry refers to:
- a name defined at the top level of the same module: that definition (a function or class is
  followed whole: decorators, defaults, bases, methods);
- a name imported from a project module (`autoexplain` and its subpackages), at the top of the file or
  inside a function, and `module.attr` for an imported module: that symbol of that module;
- a project module used as a value, a name that module does not define at its top level (a
  re-export), or `import autoexplain.x` inside a function: the whole module.

Every module reached is hashed whole, together with its packages' `__init__` files, and so are the
references of its top-level statements that are not definitions (they run on import). So an edit of
the code anywhere in a module the stage reaches changes the key; an edit to a module it only reaches
through a name it never uses (layer.py imports every stage's functions) does not. What is hashed is
the module's syntax tree without its docstrings and positions, not its bytes: a comment, a docstring,
blank lines or a line wrapped differently compute the same thing, so they keep every stage's
finished outputs (a stage reruns for minutes to hours). The tree's dump is Python's own; the project
runs on one Python minor version (pyproject's requires-python), so it is the same on every machine.

Per process, each file is parsed once until its size or mtime changes, and an identity is
recomputed only when a file it read (or a package folder) changed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

PACKAGES = ("autoexplain",)
# Subpackages whose source sits beside the library's folder in a checkout: the contracts, the task
# wrappers and the flows install as `autoexplain.schemas`, `.tasks` and `.flows` (pyproject's
# package-dir says the same; tests/test_layers.py checks), so that no top-level `schemas`, `tasks`
# or `flows` of another package can clash with them.
SOURCE_FOLDERS = {"autoexplain.schemas": "schemas", "autoexplain.tasks": "tasks", "autoexplain.flows": "flows"}
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the project packages

WHOLE = "*"  # the symbol name meaning "the whole module"


class _Module:
    """One parsed file: its top-level definitions and, per definition, what it refers to."""

    def __init__(self, name: str, path: Path, root: Path):
        self.name, self.path = name, path
        tree = ast.parse(path.read_bytes(), str(path))
        self.digest = hashlib.sha256(_code_form(tree).encode()).hexdigest()
        self.is_package = path.name == "__init__.py"
        self.imports: dict[str, tuple[str, str]] = {}  # top-level name -> (module, symbol or WHOLE)
        self.defs: dict[str, list[ast.AST]] = {}  # top-level name -> its defining statements
        self.always: list[ast.AST] = []  # statements run on import that define nothing
        self._top(tree.body, root)
        self._refs: dict[str, set[tuple[str, str]]] = {}

    def _top(self, body: list[ast.stmt], root: Path) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for bound, target in _import_targets(node, self, root):
                    self.imports[bound] = target
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                if all(isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Starred, ast.Load, ast.Store))
                       for t in targets for n in ast.walk(t)):
                    for name in names:
                        self.defs.setdefault(name, []).append(node)
                else:  # `module.attr = ...`, `table[k] = ...`: a side effect of importing
                    self.always.append(node)
            elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
                # try/except ImportError, if TYPE_CHECKING: their bodies bind top-level names.
                self.always += [getattr(node, f) for f in ("test", "items") if hasattr(node, f)]
                for block in ("body", "orelse", "finalbody"):
                    self._top(getattr(node, block, []), root)
                for handler in getattr(node, "handlers", []):
                    if handler.type:
                        self.always.append(handler.type)
                    self._top(handler.body, root)
            else:
                self.always.append(node)

    def refs(self, symbol: str, root: Path) -> set[tuple[str, str]]:
        """The (module, symbol) pairs that a top-level name, or WHOLE, refers to."""
        if symbol not in self._refs:
            if symbol == WHOLE:
                out = {(self.name, s) for s in self.defs} | set(self.imports.values())
                out |= _references(self.always, self, root)
            elif symbol in self.imports:
                out = {self.imports[symbol]}
            elif symbol in self.defs:
                out = _references(self.defs[symbol], self, root)
            else:  # not defined here at the top level (star import, module __getattr__): all of it
                out = {(self.name, WHOLE)}
            self._refs[symbol] = out
        return self._refs[symbol]


def _code_form(tree: ast.Module) -> str:
    """The module's code as text that comments, docstrings and layout do not change: the dump of its
    tree without positions, after the docstrings of the module, its classes and its functions are
    dropped from the tree (in place: nothing in the analysis reads them, and nothing in the project
    reads a docstring to compute an output)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                del node.body[0]
    return ast.dump(tree, include_attributes=False)


def _module_path(name: str, root: Path) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    bases = [root.joinpath(*name.split("."))]  # as installed
    for package, folder in SOURCE_FOLDERS.items():
        if name == package or name.startswith(package + "."):  # as checked out
            bases.insert(0, root.joinpath(folder, *name[len(package) + 1 :].split(".")) if name != package else root / folder)
    for base in bases:
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
    return None


def _import_targets(node: ast.Import | ast.ImportFrom, module: _Module, root: Path):
    """(bound name, (module, symbol)) for each project name an import statement binds."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if _module_path(alias.name, root):
                # `import a.b` binds `a` (its uses are `a.b.x`): take the whole of a.b.
                yield (alias.asname or alias.name.split(".")[0]), (alias.name, WHOLE)
        return
    if node.level:
        parts = module.name.split(".")
        if not module.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not _module_path(base, root):
        return
    for alias in node.names:
        if alias.name == "*":
            yield "*", (base, WHOLE)
        elif _module_path(f"{base}.{alias.name}", root):
            yield (alias.asname or alias.name), (f"{base}.{alias.name}", WHOLE)
        else:
            yield (alias.asname or alias.name), (base, alias.name)


def _references(nodes: Iterable[ast.AST], module: _Module, root: Path) -> set[tuple[str, str]]:
    """What the given statements refer to: this module's names, imported names and, for an
    imported module `m`, `m.attr` as the one symbol; imports inside them count as uses."""
    out: set[tuple[str, str]] = set()
    attr_bases: set[int] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out |= {target for _, target in _import_targets(node, module, root)}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = module.imports.get(node.value.id)
                if target and target[1] == WHOLE:
                    sub = f"{target[0]}.{node.attr}"
                    out.add((sub, WHOLE) if _module_path(sub, root) else (target[0], node.attr))
                    attr_bases.add(id(node.value))
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Name) and id(node) not in attr_bases:
                if node.id in module.imports:
                    out.add(module.imports[node.id])
                elif node.id in module.defs:
                    out.add((module.name, node.id))
    return out


# path -> (mtime_ns, size, parsed module)
_PARSED: dict[Path, tuple[int, int, _Module]] = {}
# One parse at a time: task threads compute their keys at once (and the store's gate derives its
# suite versions here too), and CPython 3.11's parser is not safe across threads: two concurrent
# `ast.parse` calls can fail with "AST constructor recursion depth mismatch".
_PARSE_LOCK = threading.Lock()
# (root, entries) -> (signature of what was read, identity, modules)
_IDENTITIES: dict[tuple, tuple[tuple, str, tuple[str, ...]]] = {}


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _parsed(name: str, root: Path) -> _Module | None:
    path = _module_path(name, root)
    if path is None:
        return None
    mtime, size = _stat(path)
    cached = _PARSED.get(path)
    if cached is None or cached[:2] != (mtime, size):
        with _PARSE_LOCK:
            cached = (mtime, size, _Module(name, path, root))
        _PARSED[path] = cached
    return cached[2]


def _entry(entry: str | Callable) -> tuple[str, str]:
    if callable(entry):
        return entry.__module__, entry.__qualname__.split(".")[0]
    module, _, symbol = entry.partition(":")
    return module, symbol or WHOLE


def closure(*entries: str | Callable, root: str | os.PathLike | None = None) -> list[str]:
    """The project modules that the entry points reach, sorted."""
    root = Path(root) if root is not None else ROOT
    seen: set[tuple[str, str]] = set()
    todo = [_entry(e) for e in entries]
    modules: set[str] = set()
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        module = _parsed(item[0], root)
        if module is None:
            raise ValueError(f"{item[0]} is not a module of {', '.join(PACKAGES)} under {root}")
        if module.name not in modules:
            modules.add(module.name)
            todo += [(module.name, "__always__")]
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            parts = module.name.split(".")
            todo += [(".".join(parts[:i]), WHOLE) for i in range(1, len(parts))]
        if item[1] == "__always__":
            todo += _references(module.always, module, root)
        else:
            todo += module.refs(item[1], root)
    return sorted(modules)


def code_identity(*entries: str | Callable, root: str | os.PathLike | None = None) -> str:
    """A 12-hex-digit hash of the source of every project module the entry points reach."""
    root = Path(root) if root is not None else ROOT
    key = (root, tuple(_entry(e) for e in entries))
    cached = _IDENTITIES.get(key)
    if cached is not None and _signature(cached[2], root) == cached[0]:
        return cached[1]
    modules = tuple(closure(*entries, root=root))
    signature = _signature(modules, root)
    digests = {m: _parsed(m, root).digest for m in modules}
    identity = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:12]
    _IDENTITIES[key] = (signature, identity, modules)
    return identity


def _signature(modules: Iterable[str], root: Path) -> tuple:
    """The stat of every module read and of every package folder (a new file there may be a new
    module that an existing import now resolves to)."""
    folders = {p for p in root.iterdir() if p.name in (*PACKAGES, *SOURCE_FOLDERS.values()) and p.is_dir()}
    folders |= {d for p in folders for d in p.rglob("*") if d.is_dir() and d.name != "__pycache__"}
    paths = [_module_path(m, root) for m in modules]
    return tuple((str(p), *_stat(p)) for p in sorted(folders) + paths)
