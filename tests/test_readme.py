"""The README's and the docs pages' examples run as written and print what they show.

The convention, for readers: a ```python block is a complete program; when it
prints, the ```text block right after it is its output, compared line by line
(trailing spaces aside) with what the block prints. A block whose first line is
``# file: NAME.py`` is a module the page asks the reader to save: it is written
under that name into the working folder of the page's other blocks, which import
it. A block that imports a library that is not installed is skipped, naming it.
A page that holds the line ``<!-- examples: one session -->`` is one session
instead: each block runs after the page's earlier blocks, in their namespace
(their output is checked by their own tests).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
FILE_LINE = re.compile(r"# file: ([\w.]+\.py)\n")
SESSION = "<!-- examples: one session -->"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: pathlib.Path
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    output: str | None  # the text block right after a python block

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        match = FILE_LINE.match(self.code)
        return match.group(1) if match else None


def blocks(page: pathlib.Path) -> list[Block]:
    """The fenced blocks of ``page``, each python block with the output shown after it."""
    text = page.read_text(encoding="utf-8")
    found = list(FENCE.finditer(text))
    out = []
    for i, match in enumerate(found):
        output = None
        after = found[i + 1] if i + 1 < len(found) else None
        if (
            match.group(1) == "python"
            and after is not None
            and after.group(1) == "text"
            and not text[match.end() : after.start()].strip()
        ):
            output = after.group(2)
        line = text.count("\n", 0, match.start()) + 1
        out.append(Block(page, match.group(1), match.group(2), line, output))
    return out


BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
PROGRAMS = [b for b in PYTHON if b.file_name is None]


def missing_imports(code: str) -> list[str]:
    """The top-level modules ``code`` imports that are not installed here."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.fixture
def page_folder(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pathlib.Path]:
    """An empty working folder on ``sys.path``; modules imported from it are forgotten."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


def save_files(page: pathlib.Path, folder: pathlib.Path) -> None:
    """Write the page's ``# file:`` blocks into ``folder``."""
    for block in blocks(page):
        if block.lang == "python" and block.file_name:
            (folder / block.file_name).write_text(block.code, encoding="utf-8")


def test_pages_have_examples() -> None:
    assert len([b for b in PROGRAMS if b.page == README]) >= 2
    assert {b.page.name for b in PROGRAMS} >= {
        "README.md",
        "writing-a-rule.md",
        "writing-an-adapter.md",
        "flat-buffers.md",
    }


@pytest.mark.parametrize("block", PROGRAMS, ids=[b.id for b in PROGRAMS])
def test_example_runs_and_prints_its_output(
    block: Block, page_folder: pathlib.Path
) -> None:
    saved = {b.file_name.removesuffix(".py") for b in blocks(block.page) if b.file_name}
    missing = [name for name in missing_imports(block.code) if name not in saved]
    if missing:
        pytest.skip(f"{block.id} imports {', '.join(missing)}, which is not installed")
    save_files(block.page, page_folder)
    namespace = {"__name__": "__main__"}
    if SESSION in block.page.read_text(encoding="utf-8"):
        earlier = [b for b in PROGRAMS if b.page == block.page and b.line < block.line]
        with contextlib.redirect_stdout(io.StringIO()):
            for b in earlier:
                exec(  # noqa: S102
                    compile(b.code, f"{b.page}:{b.line}", "exec", dont_inherit=True),
                    namespace,
                )
    stdout = io.StringIO()
    code = compile(block.code, f"{block.page}:{block.line}", "exec", dont_inherit=True)
    with contextlib.redirect_stdout(stdout):
        exec(code, namespace)  # noqa: S102
    printed = stdout.getvalue()
    if block.output is None:
        assert not printed, f"{block.id} prints but shows no ```text output after it"
    else:
        assert lines(printed) == lines(block.output), f"{block.id} printed {printed!r}"


@pytest.mark.parametrize(
    "block", [b for b in PYTHON if b.file_name], ids=lambda b: b.id
)
def test_saved_module_compiles_and_is_used(block: Block) -> None:
    compile(block.code, f"{block.page}:{block.line}", "exec", dont_inherit=True)
    module = block.file_name.removesuffix(".py") if block.file_name else ""
    users = [b for b in blocks(block.page) if b is not block and module in b.code]
    assert users, f"{block.id} saves {block.file_name} but no other block uses it"


def test_readme_custom_rule_apply_runs() -> None:
    """The README's own rule is stepped, and its output shows ``apply``'s result."""
    (rule,) = [
        b for b in PROGRAMS if b.page == README and "class DecayDescent" in b.code
    ]
    assert "opt.update(" in rule.code
    # 1 - 0.1/√1 - 0.1/√2 after two steps, and the counter at 3: apply ran twice.
    assert rule.output is not None
    assert lines(rule.output) == ["[0.82928932 0.82928932 0.82928932] 3"]


def test_readme_size_and_first_block() -> None:
    """README ≤ 8 KB; its first block installs, runs the demo and the tests."""
    assert len(README.read_bytes()) <= 8192
    first = blocks(README)[0]
    assert first.lang == "bash"
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert commands[0].startswith("pip install")
    assert "agnosticopt demo" in commands
    assert "pytest" in commands
    extras = re.search(r'-e "\.\[([\w,]+)\]"', commands[0])
    assert extras is not None
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(declared)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_exist(page: pathlib.Path) -> None:
    """Each relative link of a page names a file of the repository."""
    targets = [
        t for t in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in t
    ]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.slow
def test_adapter_page_commands_run(page_folder: pathlib.Path) -> None:
    """The adapter page's shell commands pass on the module the page saves."""
    page = ROOT / "docs" / "writing-an-adapter.md"
    save_files(page, page_folder)
    (bash,) = [b for b in blocks(page) if b.lang == "bash"]
    script = bash.code.replace("\\\n", " ")
    bin_dir = pathlib.Path(sys.executable).parent
    for command in filter(None, map(str.strip, script.splitlines())):
        words = shlex.split(command)
        env = {}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        words[0] = str(bin_dir / words[0])
        result = subprocess.run(
            words,
            cwd=page_folder,
            env={**_environ(), **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, (
            f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


def _environ() -> dict[str, str]:
    """This process's environment without the conformance suite's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AGNOSTICOPT_")}
