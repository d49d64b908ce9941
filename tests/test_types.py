"""The package type-checks: mypy, with pyproject.toml's [tool.mypy] settings,
on tfem as installed (tfem, tfem.broker, tfem.registry), and _native.pyi
declares only what the built tfem._native has.

The editable install maps tfem to libtfem/ through an import hook that mypy
cannot follow, so mypy reads a tree of links laid out as the installed
package is."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# setup.py's package_dir: where each part of the installed package comes from
SUBPACKAGES = {"broker": ROOT / "broker", "registry": ROOT / "registry", "native": ROOT / "libtfem" / "native"}

pytest.importorskip("mypy", reason="mypy comes with the [test] extras")


def _package_tree(into: pathlib.Path) -> pathlib.Path:
    """A `tfem` directory of links: libtfem's modules and stubs, and the subpackages."""
    package = into / "tfem"
    package.mkdir(parents=True)
    for source in sorted((ROOT / "libtfem").glob("*.py*")):
        if source.suffix in (".py", ".pyi"):
            (package / source.name).symlink_to(source)
    for name, source in SUBPACKAGES.items():
        (package / name).symlink_to(source, target_is_directory=True)
    return into


def test_mypy_is_clean(tmp_path: pathlib.Path) -> None:
    search = _package_tree(tmp_path / "src")
    env = dict(os.environ, MYPYPATH=str(search))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "-p", "tfem"],
        cwd=search, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, f"mypy found errors:\n{run.stdout}{run.stderr}"


def test_stub_names_exist_in_the_native_module() -> None:
    """Every constant and function _native.pyi declares on lib is in the
    built module, as an int or a function as declared."""
    from tfem._native import lib

    stub = ast.parse((ROOT / "libtfem" / "_native.pyi").read_text())
    declared = next(node for node in stub.body if isinstance(node, ast.ClassDef) and node.name == "_Lib")
    constants = [n.target.id for n in declared.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    functions = [n.name for n in declared.body if isinstance(n, ast.FunctionDef)]
    assert constants and functions
    missing = [name for name in constants if not isinstance(getattr(lib, name, None), int)]
    missing += [name for name in functions if not callable(getattr(lib, name, None))]
    assert missing == [], "declared in _native.pyi, not in tfem._native"
