"""mkdocs hook: API pages from a package's ``__all__``; results files included.

A page holding ``<!-- api: agnosticopt -->`` gets, in place of that line, one
``::: agnosticopt.NAME`` block (mkdocstrings) per public name, grouped by the module
that defines it under that module's one-line summary. Names added to ``__all__``
appear without editing the page. ``<!-- include: path -->`` inserts a markdown
file of the repository, so the speed page shows the latest benchmark results.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shutil
from typing import Any

from mkdocs.plugins import event_priority

ROOT = pathlib.Path(__file__).resolve().parent.parent
# mkdocstrings reads the source from here (mkdocs.yml: handlers.python.paths).
SOURCE = ROOT / "build" / "docs-src"

MARKER = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)
INCLUDE = re.compile(r"^<!-- include: ([\w./-]+) -->$", re.MULTILINE)
# The order of the sections; modules not listed follow in alphabetical order.
FIRST = (
    "_setup",
    "_update",
    "_adjust",
    "_leaf",
    "_sgd",
    "_adam",
    "_adaptive",
    "_decay",
    "_clip",
    "_wrappers",
    "_rule",
)


def _summary(module_name: str) -> str:
    """The first line of a module's docstring, without reST markup or final period."""
    doc = (importlib.import_module(module_name).__doc__ or module_name).strip()
    line = doc.splitlines()[0].rstrip(".")
    line = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", line)
    return line.replace("``", "`")


def _home(package: str, obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not module.startswith(package.split(".")[0]):
        return ""
    return module


def render(package: str) -> str:
    """The markdown of ``package``'s reference: a section per defining module."""
    mod = importlib.import_module(package)
    groups: dict[str, list[str]] = {}
    for name in mod.__all__:
        groups.setdefault(_home(package, getattr(mod, name)), []).append(name)

    def order(module: str) -> tuple[int, str]:
        tail = module.rsplit(".", 1)[-1]
        return (
            FIRST.index(tail) if tail in FIRST else len(FIRST) + (module == ""),
            module,
        )

    out = []
    for module in sorted(groups, key=order):
        out.append(f"## {_summary(module) if module else 'Constants'}\n")
        for name in groups[module]:
            out.append(
                f"::: {package}.{name}\n    options:\n      heading_level: 3\n"
                "      show_root_heading: true\n      show_root_full_path: false\n"
            )
    return "\n".join(out)


def _package_dirs() -> dict[str, str]:
    """pyproject's ``[tool.setuptools.package-dir]``: package name -> source folder."""
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    return dict(tool.get("package-dir", {}))


@event_priority(100)  # before mkdocstrings reads the sources
def on_config(config: Any) -> Any:
    """Lay the installed package out as installed (adapters/ as agnosticopt/adapters).

    The source tree maps ``adapters/`` and ``conformance/`` into the package
    (pyproject's ``package-dir``); mkdocstrings reads source folders, so it gets a
    tree of links with that layout.
    """
    shutil.rmtree(SOURCE, ignore_errors=True)
    for package, folder in sorted(_package_dirs().items()):
        target = SOURCE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted((ROOT / folder).iterdir()):
            if entry.name != "__pycache__" and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return config


def include(path: str) -> str:
    """A markdown file of the repository (a benchmark's results), its tables set apart.

    A table must follow a blank line to render; the results files put their
    caption on the line just above.
    """
    lines: list[str] = []
    for line in (ROOT / path).read_text(encoding="utf-8").splitlines():
        if (
            line.startswith("|")
            and lines
            and lines[-1]
            and not lines[-1].startswith("|")
        ):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace ``<!-- api: package -->`` and ``<!-- include: path -->`` lines."""
    markdown = INCLUDE.sub(lambda m: include(m.group(1)), markdown)
    return MARKER.sub(lambda m: render(m.group(1)), markdown)
