"""Every code block of README.md and docs/ runs (or is checked) here, so an example that uses an
undefined name or a flag that does not exist fails the build:

- ```python blocks are executed: alone, or as a job when the info string says so: ``launch=N``
  (``python -m tandem.launch --nproc N``), ``torchrun=N`` (a real torchrun), ``ps=PxW``
  (``python -m tandem.launch --ps P --workers W``);
- ```bash blocks tagged ``run`` are executed from the repository root with the installed ``tandem``
  command first on PATH (``root``: only as root, the tests on simulated hosts); in every other
  bash block each ``tandem ...`` command line is parsed by the real CLI (its options up to ``--``,
  then ``--help``) and each ``scripts/...`` it names must exist;
- ```rust blocks are compiled by rustdoc (the facade crate includes each page under
  ``cfg(doctest)``), so they may not be ``ignore``d; ```text blocks are diagrams.

Every measured figure (a ratio such as 1.5x, a percentage, microseconds) quoted in a paragraph must
link to the BENCHMARKS.md section that holds its command, machine and peer.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

from conftest import ROOT, clean_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python", "bash", "rust", "text"}


class Block(NamedTuple):
    page: Path
    line: int
    lang: str
    tags: List[str]
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> List[Block]:
    out, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        words = m.group(1).replace(",", " ").split()
        start, i = i + 1, i + 1
        while i < len(lines) and lines[i] != "```":
            i += 1
        out.append(Block(page, start, words[0] if words else "", words[1:], "\n".join(lines[start:i])))
        i += 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]


def test_every_block_declares_a_known_language() -> None:
    assert ALL, "no code blocks found"
    bad = [f"{b.name} ({b.lang or 'no language'})" for b in ALL if b.lang not in LANGS]
    assert not bad, f"code blocks must be one of {sorted(LANGS)}: {bad}"


def _job(b: Block, path: Path) -> List[str]:
    for tag in b.tags:
        key, _, value = tag.partition("=")
        if key == "launch":
            return [sys.executable, "-m", "tandem.launch", "--nproc", value, "--no-log-files", str(path)]
        if key == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", value,
                    str(path)]
        if key == "ps":
            ps, workers = value.split("x")
            return [sys.executable, "-m", "tandem.launch", "--ps", ps, "--workers", workers, "--no-log-files",
                    str(path)]
    return [sys.executable, str(path)]


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python"], ids=lambda b: b.name)
def test_python_blocks_run(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "example.py"
    path.write_text(block.code + "\n")
    out = subprocess.run(_job(block, path), capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=clean_env(OMP_NUM_THREADS="1", PYTHONPATH=""))
    assert out.returncode == 0, f"{block.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _commands(code: str) -> List[List[str]]:
    """The `tandem ...` command lines of a shell block, as words (comments and pipes cut off)."""
    found = []
    for line in code.replace("\\\n", " ").split("\n"):
        line = line.split(" #", 1)[0].split("|", 1)[0].split("&&", 1)[0].strip()
        words = shlex.split(line) if line else []
        for lead in (["cargo", "run", "--release", "-p", "tandem-cli", "--"], ["python", "-m", "tandem"]):
            if words[: len(lead)] == lead:
                words = ["tandem", *words[len(lead):]]
        if words and words[0] in ("tandem", "target/release/tandem"):
            found.append(words[1:])
    return found


def _cli() -> List[str]:
    return [sys.executable, "-m", "tandem"]


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash" and not ({"run", "root"} & set(b.tags))],
                         ids=lambda b: b.name)
def test_shell_commands_parse(block: Block) -> None:
    for args in _commands(block.code):
        head = args[: args.index("--")] if "--" in args else args
        out = subprocess.run([*_cli(), *head, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{block.name}: `tandem {' '.join(args)}` does not parse:\n{out.stderr}"
    for script in re.findall(r"(?<![\w/])(scripts/[\w-]+)", block.code):
        assert os.access(ROOT / script, os.X_OK), f"{block.name} names {script}, which is not an executable script"


def _shell_env() -> dict:
    return clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                     OMP_NUM_THREADS="1")


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash" and "run" in b.tags], ids=lambda b: b.name)
def test_shell_blocks_run(block: Block) -> None:
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=_shell_env())
    assert out.returncode == 0, f"{block.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (simulated hosts); scripts/test as root runs it")
@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash" and "root" in b.tags], ids=lambda b: b.name)
def test_shell_blocks_that_need_root_run(block: Block) -> None:
    test_shell_blocks_run(block)


def test_rust_blocks_are_compiled_as_doctests() -> None:
    facade = (ROOT / "crates" / "tandem" / "src" / "lib.rs").read_text()
    for b in ALL:
        if b.lang != "rust":
            continue
        assert "ignore" not in b.tags, f"{b.name}: a Rust block must compile (no_run is fine, ignore is not)"
        rel = os.path.relpath(b.page, ROOT / "crates" / "tandem" / "src")
        assert f'include_str!("{rel}")' in facade, f"{b.name}: crates/tandem/src/lib.rs must include {rel} as doctests"


FIGURE = re.compile(r"(?<![\w.])\d+(\.\d+)?\s?(x|×)(?!\w)|\d+(\.\d+)?\s?%|\d\s?µs")


def _anchors() -> set:
    slugs = set()
    for line in (ROOT / "BENCHMARKS.md").read_text().split("\n"):
        m = re.match(r"^#+ (.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            slugs.add(slug)
    return slugs


def test_every_quoted_figure_links_to_its_measurement() -> None:
    anchors = _anchors()
    missing = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for para in re.split(r"\n\s*\n", text):
            # A table is checked row by row, a paragraph as a whole.
            units = para.split("\n") if para.lstrip().startswith("|") else [para]
            for unit in units:
                if not FIGURE.search(unit):
                    continue
                links = re.findall(r"BENCHMARKS\.md#([\w\-]+)", unit)
                if not links:
                    missing.append(f"{page.name}: {unit.strip()[:100]}")
                for a in links:
                    assert a in anchors, f"{page.name}: BENCHMARKS.md#{a} is no heading of BENCHMARKS.md"
    assert not missing, "figures without a link to BENCHMARKS.md#section:\n" + "\n".join(missing)


def test_the_architecture_crate_graph_is_the_workspace_s() -> None:
    """ARCHITECTURE.md's crate graph draws exactly the workspace's normal dependencies."""
    import json

    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    drawn = set(re.findall(r"^\s*([\w-]+) --> ([\w-]+)\s*$", block, re.M))
    meta = json.loads(subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
                                     cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout)
    names = {p["name"] for p in meta["packages"]}
    actual = {(p["name"], d["name"]) for p in meta["packages"] for d in p["dependencies"]
              if d["name"] in names and d.get("kind") is None}
    assert drawn == actual, f"missing from the drawing: {sorted(actual - drawn)}; drawn but not in Cargo.toml: {sorted(drawn - actual)}"
