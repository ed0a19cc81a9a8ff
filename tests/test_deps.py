"""dvc.yaml's code dependencies are exactly what each stage's script imports.

A stage's code deps (its `deps` under `stages/` and `src/`) must be the import closure of
its script within `src/mdser`: the script itself and every `mdser` module that running it
imports, transitively, including imports inside functions, and the `__init__.py` of every
package on the way (importing `mdser.corpora.manifest` runs `mdser/corpora/__init__.py`).
A package folder may stand for its files only when the closure holds every `.py` file in
it. The closure is read from the code with `ast`, so the test follows the code as it
changes: a missing dep (DVC would not re-run the stage when that code changes) and an
extra one (DVC would re-run it for nothing) both fail.

The structure that keeps `dvc repro` from deleting outputs on a bad parameter is checked
here too: the `check` stage reads all of params.yaml and every other stage depends on its
output, so DVC runs it first. No stage but `check` depends on the `runtime` section.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "mdser"
CHECK_OUT = "data/params.ok"


# --- the import closure -------------------------------------------------------------------


def module_file(name: str) -> Path | None:
    """`mdser.a.b` -> src/mdser/a/b.py or src/mdser/a/b/__init__.py (None: not a module)."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, in functions, in branches;
    not the ones under `if TYPE_CHECKING:` (never executed)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _package_of(path: Path) -> str:
    """The dotted package a file's relative imports start from."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1])


def imported_modules(path: Path) -> set[str]:
    """The `mdser` module names one file's imports name (modules, not the names in them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
            continue
        if node.level:  # relative: from . import x / from .a import b
            if not path.is_relative_to(SRC):
                raise AssertionError(f"{path}: relative import outside the package")
            base = _package_of(path).split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        names.add(module)
        # `from mdser import audio`: the name may itself be a module
        names |= {f"{module}.{alias.name}" for alias in node.names
                  if module_file(f"{module}.{alias.name}") is not None}
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def closure(script: Path) -> set[Path]:
    """The script and every file of `src/mdser` that importing its imports runs."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way, then the module
                prefix = ".".join(parts[:i])
                found = module_file(prefix)
                if found is None:
                    raise AssertionError(f"{path.relative_to(ROOT)} imports {name}: "
                                         f"no module {prefix} under src/")
                todo.append(found)
    return seen


# --- dvc.yaml -----------------------------------------------------------------------------


def dvc_stages() -> dict[str, dict]:
    """Each stage's definition; a foreach stage's `do` block."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    return {name: s.get("do", s) for name, s in doc["stages"].items()}


def stage_script(stage: dict) -> Path:
    match = re.search(r"\bpython\s+(stages/\S+\.py)\b", stage["cmd"])
    assert match, f"no `python stages/<script>.py` in {stage['cmd']!r}"
    return ROOT / match.group(1)


def dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def is_code(dep: str) -> bool:
    return dep.startswith(("src/", "stages/"))


def python_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def drift(name: str, stage: dict) -> list[str]:
    """What is wrong with one stage's code deps (empty: nothing)."""
    script = stage_script(stage)
    if not script.is_file():
        return [f"{name}: its script {script.relative_to(ROOT)} does not exist"]
    want = closure(script)
    problems, listed = [], set()
    for dep in filter(is_code, dep_paths(stage)):
        path = ROOT / dep
        if path.is_dir():
            files = python_files(path)
            outside = sorted(str(p.relative_to(ROOT)) for p in files - want)
            if outside:
                problems.append(f"{name}: lists the folder {dep}, but does not import {outside}")
            listed |= files
        elif path.is_file():
            listed.add(path)
        else:
            problems.append(f"{name}: lists {dep}, which does not exist")
    missing = sorted(str(p.relative_to(ROOT)) for p in want - listed)
    extra = sorted(str(p.relative_to(ROOT)) for p in listed - want)
    if missing:
        problems.append(f"{name}: imports {missing}, not in its deps")
    if extra:
        problems.append(f"{name}: lists {extra}, which it does not import")
    return problems


STAGES = dvc_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_import_closure_of_the_stage_script(name):
    problems = drift(name, STAGES[name])
    assert not problems, "\n".join(problems)


def test_every_stage_imports_the_params_schema():
    for name, stage in STAGES.items():
        script = stage_script(stage)
        assert script.is_file(), f"{name}: its script {script.relative_to(ROOT)} does not exist"
        assert ROOT / "src/mdser/params.py" in closure(script), name


# --- the closure itself, on a made-up package ------------------------------------------------


def test_the_closure_follows_function_local_relative_and_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from mdser.b import g\n",
        "b.py": "from . import c\nfrom mdser.sub.d import h\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mdser import e\n",
        "e.py": "",
        "unused.py": "",
        "sub/__init__.py": "from .d import h\n",
        "sub/d.py": "import numpy\nh = 1\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    script = tmp_path / "stage.py"
    script.write_text("import json\nfrom mdser import a\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path / "src")
    got = {str(p.relative_to(tmp_path)) for p in closure(script)}
    assert got == {"stage.py"} | {f"src/mdser/{r}" for r in
                                  ("__init__.py", "a.py", "b.py", "c.py", "sub/__init__.py", "sub/d.py")}


# --- parameters checked before anything else ------------------------------------------------


def test_check_stage_reads_all_of_params_yaml_and_runs_first():
    check = STAGES["check"]
    assert stage_script(check) == ROOT / "stages/check.py"
    assert check.get("params") == [{"params.yaml": None}], check.get("params")
    outs = [o if isinstance(o, str) else next(iter(o)) for o in check["outs"]]
    assert outs == [CHECK_OUT]
    for name, stage in STAGES.items():
        if name != "check":
            assert CHECK_OUT in dep_paths(stage), f"{name} does not depend on {CHECK_OUT}"


def test_no_stage_but_check_depends_on_the_runtime_section():
    for name, stage in STAGES.items():
        if name == "check":
            continue
        for p in stage.get("params", []):
            keys = [p] if isinstance(p, str) else [k for v in p.values() for k in (v or ["*"])]
            assert not [k for k in keys if k == "runtime" or k.startswith("runtime.")
                        or k == "*"], f"{name} depends on {p}"
