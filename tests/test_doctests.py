"""The docstring examples of the installed package run and print what they show.

pytest's ``--doctest-modules`` would import the source folders as found on disk
(``adapters/`` as a top-level ``adapters``); here each module is imported by its
installed name (``agnosticopt.adapters.torch``) and its docstrings are run with
:mod:`doctest`. A module that needs a backend that is not installed is skipped
with that reason.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

PACKAGES = ("agnosticopt", "agnosticopt.adapters", "agnosticopt.conformance")
# Modules that run something when imported (``python -m``) or are pytest's.
NOT_IMPORTED = ("__main__", "conftest", "test_")


def module_names() -> list[str]:
    """Every module of the installed package, subpackages included."""
    names = set(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names.update(m.name for m in pkgutil.walk_packages(path, package + "."))
    return sorted(n for n in names if not n.rsplit(".", 1)[-1].startswith(NOT_IMPORTED))


def load(name: str) -> ModuleType | str:
    """The module, or why it cannot be imported here (a missing optional library)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "agnosticopt":
            raise
        return f"{name} needs {e.name}, which is not installed"


def collect() -> list[object]:
    params: list[object] = []
    for name in module_names():
        module = load(name)
        if isinstance(module, str):
            params.append(
                pytest.param(None, id=name, marks=pytest.mark.skip(reason=module))
            )
            continue
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
            if test.examples:
                params.append(pytest.param(test, id=test.name))
    return params


DOCTESTS = collect()


def test_doctests_found() -> None:
    """The public modules' examples are collected (the package's front page among them)."""
    names = {p.id for p in DOCTESTS}  # type: ignore[attr-defined]
    assert "agnosticopt" in names
    assert len(names) >= 5


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_examples(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
