"""A stage's code identity is derived from the project source it reaches, never listed by hand.

Each test works on a copy of the project packages (`root=`), edits one file and checks whether a
stage's identity moved: an edit of the code of a module the stage reaches (directly or further down)
must move it; an edit to one it does not reach must not, and neither must an edit that changes no
code (comments, docstrings, layout).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autoexplain import identity, layer, record
from autoexplain.identity import closure, code_identity

REPO = Path(identity.__file__).resolve().parent.parent
# One entry point per stage: the function that computes and keys its output.
STAGES = {
    "windows": "autoexplain.record:build_windows",
    "records": "autoexplain.record:record_layers",
    "explain": "autoexplain.layer:run_explain",
    "simulate": "autoexplain.layer:run_simulate",
    "score": "autoexplain.layer:run_score",
}


@pytest.fixture
def copy(tmp_path) -> Path:
    for package in identity.PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit(root: Path, module: str, text: str = "\n_AN_EDIT = 1\n") -> None:
    path = identity._module_path(module, root)
    path.write_text(path.read_text() + text)


def moved(root: Path, entry: str, module: str) -> bool:
    before = code_identity(entry, root=root)
    edit(root, module)
    return code_identity(entry, root=root) != before


def test_a_function_is_its_module_and_name():
    assert code_identity(layer.run_simulate) == code_identity(STAGES["simulate"])
    assert code_identity(record.record_layers) == code_identity(STAGES["records"])
    assert len(code_identity(layer.run_score)) == 12


@pytest.mark.parametrize("stage, direct, two_down, unrelated", [
    # layer -> pipeline -> explain (shuffled_explanations, escape_token, ENDING); only the
    # explain stage makes the embedding explainer
    ("simulate", "autoexplain.pipeline", "autoexplain.explain", "autoexplain.explain_embedding"),
    # record -> selection; record -> subject -> fused
    ("records", "autoexplain.selection", "autoexplain.fused", "autoexplain.llm"),
    # layer -> pipeline -> scoring; run_score never reaches the explainers and simulators
    ("score", "autoexplain.pipeline", "autoexplain.scoring", "autoexplain.llm"),
    # layer -> explain_embedding (make_explainer) -> exact; explaining never scores
    ("explain", "autoexplain.explain_embedding", "autoexplain.exact", "autoexplain.scoring"),
])
def test_edits_move_the_identity_of_the_stages_that_reach_them(copy, stage, direct, two_down, unrelated):
    entry = STAGES[stage]
    assert moved(copy, entry, direct), f"{stage} missed an edit of {direct}"
    assert moved(copy, entry, two_down), f"{stage} missed an edit of {two_down}"
    assert not moved(copy, entry, unrelated), f"{stage} moved on an edit of {unrelated}"


def test_the_former_holes_are_covered(copy):
    # Simulate reads explain.shuffled_explanations, escape_token and ENDING.
    assert "autoexplain.explain" in closure(STAGES["simulate"])
    assert moved(copy, STAGES["simulate"], "autoexplain.explain")
    # Records are dealt by records.TOP_DEAL, RANDOM_DEAL and QUANTILE_BINS.
    assert "autoexplain.records" in closure(STAGES["records"])
    assert moved(copy, STAGES["records"], "autoexplain.records")
    # Windows are built by record.py itself, which the old list left out.
    assert "autoexplain.record" in closure(STAGES["windows"])


def test_a_new_import_inside_a_function_joins_the_closure(copy):
    entry = STAGES["score"]
    assert "autoexplain.planted" not in closure(entry, root=copy)
    before = code_identity(entry, root=copy)
    source = copy / "autoexplain" / "layer.py"
    body = "    layer = simulations.layer\n    params = {\"layer\": layer, \"n_boot\""
    assert source.read_text().count(body) == 1
    source.write_text(source.read_text().replace(body, "    from autoexplain.planted import plant  # noqa: F401\n" + body))
    assert "autoexplain.planted" in closure(entry, root=copy)
    assert code_identity(entry, root=copy) != before
    assert moved(copy, entry, "autoexplain.planted")


def test_analysis_rules(tmp_path):
    """On a toy package: imports at the top and inside functions, `module.attr`, a whole module
    used as a value, relative imports and package `__init__` files."""
    pkg = tmp_path / "autoexplain"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from autoexplain import b\nfrom autoexplain.d import unused\n\n"
                "def f():\n    from .sub import c\n    return b.g() + c.h()\n\n"
                "def other():\n    return unused()\n",
        "b.py": "from autoexplain.e import E\nfrom autoexplain import d\n\ndef g():\n    return E\n\n"
                "def never():\n    return d\n",
        "d.py": "def unused():\n    return 1\n",
        "e.py": "E = 1\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import e as whole\n\ndef h():\n    return whole\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    got = closure("autoexplain.a:f", root=tmp_path)
    assert got == ["autoexplain", "autoexplain.a", "autoexplain.b", "autoexplain.e", "autoexplain.sub",
                   "autoexplain.sub.c"]
    assert "autoexplain.d" in closure("autoexplain.a:other", root=tmp_path)
    assert "autoexplain.d" in closure("autoexplain.b", root=tmp_path)  # a whole module: all it imports
    assert moved(tmp_path, "autoexplain.a:f", "autoexplain.sub.c")
    assert moved(tmp_path, "autoexplain.a:f", "autoexplain.sub")  # sub/__init__.py, run on import
    assert not moved(tmp_path, "autoexplain.a:f", "autoexplain.d")
    with pytest.raises(ValueError, match="not a module"):
        closure("numpy:array", root=tmp_path)


def test_task_keys_use_the_same_identity(copy, monkeypatch):
    """Prefect's cache_key_fn hashes `code_identity` of the stage's own function: an edit that moves
    the library's identity moves the task's key. It is the store's key function (`store.stage_key`)."""
    pytest.importorskip("prefect")
    from autoexplain.tasks import caching

    monkeypatch.setattr(identity, "ROOT", copy)
    key_fn = caching.cache_key("score", (layer.run_score,))
    params = {"records": {"key": "r"}, "simulations": {"key": "s"}}
    before = key_fn(None, params)
    assert before == key_fn(None, params)
    edit(copy, "autoexplain.scoring")
    assert key_fn(None, params) != before
    edit(copy, "autoexplain.llm")  # the score stage never reaches the LLM clients
    after = key_fn(None, params)
    edit(copy, "autoexplain.view")
    assert key_fn(None, params) == after
    from autoexplain.store import stage_key

    assert after == "score-" + stage_key({"params": params, "prompts": ""}, layer.run_score), "one key function"


def test_edits_that_change_no_code_keep_the_identity(copy):
    """Comments, docstrings, blank lines and re-wrapped lines keep the key (and so every finished
    output); a change of any value, a string included, moves it."""
    entry, path = STAGES["records"], identity._module_path("autoexplain.selection", copy)
    original = path.read_text()
    before = code_identity(entry, root=copy)
    head, _, rest = original.partition('"""')
    doc, _, body = rest.partition('"""')
    assert head == "" and doc, "selection.py opens with its docstring"
    neutral = ['"""A new module docstring."""' + body + "\n\n# a comment\n",
               original.replace("\ndef ", "\n\n# a comment above a function\ndef ", 1),
               original.replace(":\n        \"\"\"", ":\n        \"\"\"Edited. ", 1),
               original.replace("(", "(\n    ", 1)]
    for text in neutral:
        assert text != original
        path.write_text(text)
        assert code_identity(entry, root=copy) == before, text[:200]
    # A bare string that is not a body's first statement is not a docstring; a constant is code.
    for text in (original + '\n"""not a docstring"""\n', original.replace("self.n = 0", "self.n = 1", 1)):
        assert text != original
        path.write_text(text)
        assert code_identity(entry, root=copy) != before
    path.write_text(original)
    assert code_identity(entry, root=copy) == before
