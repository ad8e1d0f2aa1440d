"""The user documentation stays short, linked, pointing at real files, and generated where it
says it is (no Ray, no models: reads files and renders the settings schema)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
MISSING_FILES = ("DESIGN.md", "../shared")  # cited by old text; neither is in the repository
SKIP_DIRS = {".venv", ".git", "node_modules", ".pytest_cache", ".loraserve"}

# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page, outside code blocks and code spans, minus external
    links and in-page anchors."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            targets.append(path)
    return targets


def repo_files(suffix: str, under: Path = ROOT) -> list[Path]:
    out = []
    for path in under.rglob(f"*{suffix}"):
        if SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            continue
        if path.is_file():
            out.append(path)
    return sorted(out)


def test_docs_folder_has_pages():
    assert doc_pages(), "docs/ holds no .md page"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; the limit is {MAX_README_LINES}: move detail into docs/"
    )


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t).resolve() for t in relative_links(README)}
    missing = [p.relative_to(ROOT).as_posix() for p in doc_pages() if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize(
    "page", [README, *doc_pages()], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_relative_links_point_into_the_repository(page):
    broken = []
    for target in relative_links(page):
        resolved = (page.parent / target).resolve()
        if not resolved.exists():
            broken.append(target)
        elif ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{page.relative_to(ROOT)} links to missing paths: {broken}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading slugs of a page, plus explicit ``<a id="...">`` anchors."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    slugs = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize(
    "page", [README, *doc_pages()], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_anchors_exist(page):
    """``page.md#anchor`` and ``#anchor`` links name a heading (or an explicit anchor)."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if "#" not in target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        path, anchor = target.split("#", 1)
        dest = (page.parent / path).resolve() if path else page
        if dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing anchors: {broken}"


def test_no_reference_to_files_outside_the_repository():
    files = repo_files(".md")
    for package in ("serve", "models"):
        files += repo_files(".py", ROOT / package)
    offenders = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in MISSING_FILES:
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, f"references to files that are not in the repository: {offenders}"


def test_configuration_page_is_generated_from_the_schema():
    from serve import settings_doc

    page = DOCS / "configuration.md"
    assert page.is_file(), "docs/configuration.md is missing: run `python -m serve.settings_doc`"
    assert page.read_text(encoding="utf-8") == settings_doc.render(), (
        "docs/configuration.md is out of date: run `python -m serve.settings_doc`"
    )


def test_configuration_example_is_a_valid_config():
    """The example on the generated page is a Serve config whose args validate."""
    import yaml

    from serve import settings_doc
    from serve.settings import AppSettings

    block = re.search(r"```yaml\n(.*?)```", settings_doc.render(), re.S)
    assert block, "the configuration page has no YAML example"
    config = yaml.safe_load(block.group(1))
    AppSettings.model_validate(config["applications"][0]["args"])
