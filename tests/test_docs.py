"""The README and the manual in docs/: short, linked correctly, in step with the import contracts, no history."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest


def _root() -> Path:
    """The repository root: the nearest folder above this file that holds pyproject.toml."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("no pyproject.toml above the tests")


ROOT = _root()
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 260
HISTORY = ["until this round", "this round", "used to be", "before the engine was"]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """TEXT without fenced code blocks and inline code spans, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives PAGE's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _links(page: Path) -> list[str]:
    """Relative link targets in PAGE's prose (web addresses and mail left out)."""
    targets = _LINK.findall(_prose(page.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config.get("tool", {}).get("importlinter", {}).get("contracts", [])


def _contract_names() -> list[str]:
    return [contract["name"] for contract in _contracts()]


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES}
    assert {"index.md", "architecture.md", "training.md", "serving.md"} <= names


def test_every_import_contract_is_explained_in_architecture() -> None:
    names = _contract_names()
    assert names, "pyproject.toml declares no [[tool.importlinter.contracts]]"
    page = (DOCS / "architecture.md").read_text()
    missing = [name for name in names if name not in page]
    assert not missing, f"docs/architecture.md does not name these import contracts: {missing}"


def test_the_layer_diagram_follows_the_layers_contract_and_names_every_module() -> None:
    """docs/architecture.md's diagram: packages stacked as the contract layers them, every module and room named."""
    (layers,) = [c["layers"] for c in _contracts() if c["name"] == "Layers point down"]
    page = (DOCS / "architecture.md").read_text()
    diagram = _FENCE.search(page[page.index("## Layers") :]).group(0)
    rows = [name for layer in layers[1:] for name in re.findall(r"\w+", layer)]  # below the command root
    top = {name: diagram.index(f"| {name} ") for name in rows}
    for upper, lower in zip(layers[1:], layers[2:]):
        assert max(top[n] for n in re.findall(r"\w+", upper)) < min(top[n] for n in re.findall(r"\w+", lower))
    words = set(re.findall(r"\w+", diagram))
    for package in rows:
        folder = ROOT / package
        parts = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        parts |= {p.parent.name for p in folder.glob("*/__init__.py")}
        assert parts <= words, f"the diagram does not name {sorted(parts - words)} of {package}/"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the reference belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings(page: Path) -> None:
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_history_narration(page: Path) -> None:
    text = page.read_text().lower()
    found = [phrase for phrase in HISTORY if phrase in text]
    assert not found, f"{page.relative_to(ROOT)} narrates history: {found}"


def test_slugs_follow_github() -> None:
    assert _slug("Scheduling: no request stalls the others") == "scheduling-no-request-stalls-the-others"
    assert _slug("Exit codes of `adapters serve`") == "exit-codes-of-adapters-serve"
    assert _slug("Many replicas: Ray Serve and Kubernetes") == "many-replicas-ray-serve-and-kubernetes"


def _commands() -> list[tuple[str, ...]]:
    """Every `adapters` command and subcommand, as the words that name it."""
    import click

    from adapterctl.cli import main

    def walk(group: click.Group, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = [path]
        for name, command in group.commands.items():
            found += walk(command, (*path, name)) if isinstance(command, click.Group) else [(*path, name)]
        return found

    return walk(main, ())


@pytest.mark.parametrize("words", _commands(), ids=lambda words: " ".join(words) or "adapters")
def test_every_command_s_help_points_at_its_page_of_the_manual(words: tuple[str, ...]) -> None:
    from click.testing import CliRunner

    from adapterctl.cli import main

    shown = CliRunner().invoke(main, [*words, "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    pages = re.findall(r"Manual: (docs/[\w-]+\.md)", shown.output)
    assert len(pages) == 1 and (ROOT / pages[0]).is_file(), shown.output
