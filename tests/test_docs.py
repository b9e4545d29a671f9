"""The documentation: benchmark figures rendered from the JSON the benchmarks write, a short README, no dead links."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def load_render():
    """bench/render.py, which is a script and not in a package."""
    spec = importlib.util.spec_from_file_location("bench_render", ROOT / "bench" / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


render = load_render()


# ---------------------------------------------------------------- benchmark figures


@pytest.mark.parametrize("doc", list(render.DOCUMENTS), ids=lambda p: p.name)
def test_benchmark_tables_are_what_the_json_gives(doc):
    messages = []
    diff = render.check(doc, render.RESULTS, messages.append)
    assert not diff, f"{doc.name} differs from bench/results: run python bench/render.py\n" + "\n".join(diff)


def test_the_main_jobs_figures_come_from_its_json(tmp_path):
    """The README's table is rendered: a changed loss in main_job.json changes it, and a typed figure fails."""
    results = tmp_path / "results"
    shutil.copytree(render.RESULTS, results)
    data = json.loads((results / "main_job.json").read_text())
    data["rows"][0]["heldout_loss"] = 1.23456
    (results / "main_job.json").write_text(json.dumps(data))
    text = render.README.read_text(encoding="utf-8")
    new = render.render_doc(text, render.load_results(results), results, lambda _: None, ("main-job",))
    assert "1.2346" in block_body(new, "main-job") and "1.2346" not in text
    doc = tmp_path / "README.md"
    body = block_body(text, "main-job")
    doc.write_text(text.replace(body, re.sub(r"\d", "9", body, count=1)), encoding="utf-8")
    assert (
        render.render_doc(
            doc.read_text(), render.load_results(render.RESULTS), render.RESULTS, lambda _: None, ("main-job",)
        )
        != doc.read_text()
    )


def block_body(text: str, name: str) -> str:
    match = next(m for m in render.MARKER.finditer(text) if m["name"] == name)
    return match["body"]


def test_a_figure_typed_into_a_block_fails_the_check(tmp_path):
    doc = tmp_path / "benchmarks.md"
    text = render.DOC.read_text(encoding="utf-8")
    body = block_body(text, "train")
    typed = re.sub(r"\d", lambda d: str((int(d[0]) + 1) % 10), body, count=1)
    doc.write_text(text.replace(body, typed), encoding="utf-8")
    assert render.check(doc, render.RESULTS, lambda _: None)


def test_a_new_measurement_changes_the_rendered_table(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(render.RESULTS, results)
    train = json.loads((results / "train.json").read_text(encoding="utf-8"))
    run = train["runs"]["florist-bf16"]
    run["wall"] *= 2
    (results / "train.json").write_text(json.dumps(train), encoding="utf-8")
    text = render.DOC.read_text(encoding="utf-8")
    new = render.render_doc(text, render.load_results(results), results, lambda _: None)
    assert f"{run['wall']:.1f}" in block_body(new, "train")
    assert f"{run['wall']:.1f}" not in block_body(text, "train")


def test_a_missing_json_leaves_its_block_and_says_which_file(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(render.RESULTS / "train.json", results)
    text = render.DOC.read_text(encoding="utf-8")
    messages = []
    new = render.render_doc(text, render.load_results(results), results, messages.append)
    assert block_body(new, "memory") == block_body(text, "memory")
    assert any(str(results / "memory.json") in m for m in messages)
    assert not any("train.json" in m for m in messages)


@pytest.mark.parametrize(
    "doc, error",
    [
        ("<!-- bench:nonsense -->\nx\n<!-- /bench:nonsense -->\n", "unknown block 'nonsense'"),
        ("<!-- bench:train -->\nnever closed\n", "not closed"),
        ("no blocks at all\n", "appears 0 times"),
    ],
)
def test_a_document_with_bad_markers_is_refused(doc, error):
    with pytest.raises(render.RenderError, match=error):
        render.render_doc(doc, {}, render.RESULTS, lambda _: None)


def test_a_json_without_the_fields_names_the_file(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"machine": "m"}), encoding="utf-8")
    text = render.DOC.read_text(encoding="utf-8")
    with pytest.raises(render.RenderError, match=r"eval\.json: cannot render block 'eval'"):
        render.render_doc(text, render.load_results(tmp_path), tmp_path, lambda _: None)


# ---------------------------------------------------------------- README and links


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def prose(text: str) -> str:
    """Markdown without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, … as on GitHub."""
    found, counts = set(), {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        found.add(f"{base}-{counts[base]}" if base in counts else base)
        counts[base] = counts.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    assert not broken_links(page)


def test_the_link_check_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: `code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-code) [gone](missing.md) [no anchor](other.md#nowhere) `[code](x.md)`\n"
        "```\n[fenced](y.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(prose(README.read_text()))}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []
