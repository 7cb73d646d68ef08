"""Import rules of readmission/: where server libraries and other libraries' internals are used.

* flask, werkzeug and gunicorn are imported only by readmission/glue/ (the serving core and
  the pipeline modules stay transport-free);
* the reach-ins into other libraries' private internals (onnxruntime's `session._sess`,
  gunicorn's `close_graceful`, `LengthReader` and `must_close`, skl2onnx's `add_node`) are
  named only in readmission/glue/, in readmission/, functions/ and events/;
* every module of readmission/serving/ and readmission/glue/ imports on its own (no cycle)
  and has at most 400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support.imports import imported_modules

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "readmission" / "glue"
SERVER_LIBRARIES = {"flask", "werkzeug", "gunicorn"}
INTERNALS = {"_sess", "close_graceful", "LengthReader", "must_close", "add_node"}


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _internal_names(tree: ast.AST) -> set[str]:
    """Every use of an INTERNALS name: attribute, imported name, bare name or string (getattr)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found & INTERNALS


def _outside_glue(path: Path) -> bool:
    return GLUE not in path.parents


def test_server_libraries_are_imported_only_by_the_glue() -> None:
    offenders = {}
    for path in _python_files("readmission"):
        tree = ast.parse(path.read_text(), filename=str(path))
        used = {m for m in imported_modules(tree) if m.split(".")[0] in SERVER_LIBRARIES}
        if used and _outside_glue(path):
            offenders[str(path.relative_to(ROOT))] = sorted(used)
    assert offenders == {}


def test_library_internals_are_reached_only_by_the_glue() -> None:
    offenders = {}
    for path in _python_files("readmission", "functions", "events"):
        names = _internal_names(ast.parse(path.read_text(), filename=str(path)))
        if names and _outside_glue(path):
            offenders[str(path.relative_to(ROOT))] = sorted(names)
    assert offenders == {}


def test_the_checks_find_what_they_look_for() -> None:
    source = (
        "import gunicorn.util\nfrom flask import Response\n"
        "run = session._sess.run\nclose = getattr(gunicorn.util, 'close_graceful')\n"
        "from gunicorn.http.body import LengthReader\n"
    )
    tree = ast.parse(source)
    assert {m.split(".")[0] for m in imported_modules(tree)} == {"gunicorn", "flask"}
    assert _internal_names(tree) == {"_sess", "close_graceful", "LengthReader"}


def _module_names(folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize(
    "module", _module_names(ROOT / "readmission" / "serving") + _module_names(GLUE)
)
def test_each_serving_and_glue_module_imports_on_its_own(module: str) -> None:
    if module == "readmission.glue.skl2onnx_patch":
        pytest.importorskip("skl2onnx")
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_serving_module_is_long() -> None:
    lengths = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in _python_files("readmission/serving", "readmission/glue")
    }
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def test_the_glue_stands_below_the_serving_core() -> None:
    """readmission.serving may use readmission.glue; glue never imports the serving core."""
    upward = {
        str(path.relative_to(ROOT)): sorted(
            name
            for name in imported_modules(ast.parse(path.read_text()))
            if name.startswith("readmission.serving")
        )
        for path in _python_files("readmission/glue")
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_the_batch_scorer_imports_no_training_library() -> None:
    """The score image is the serving image plus pyarrow: scoring a file must never import
    scikit-learn, pandas, mlflow or skl2onnx (readmission/batch_scoring.py, functions/score)."""
    probe = (
        "import sys, readmission.batch_scoring as b, readmission.serving.explain\n"
        "banned = ('sklearn', 'pandas', 'mlflow', 'skl2onnx', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
