"""The docs' code blocks are their proof: every ```python block in docs/*.md runs here.

- A fence whose info string is exactly ``python`` is executed. The blocks of one page run in
  order in one namespace, with the working directory at a fresh temporary directory, so a page
  reads like a notebook. Tracebacks name the Markdown file and its line.
- A fence ``python excerpt <module>.<name>`` shows library code without running it. Its text
  must appear in ``inspect.getsource`` of that object, piece by piece in order (a line holding
  only ``...`` separates the pieces, so a docstring can be left out): the excerpt cannot drift
  from the library.
- Any other fence (``python no-run``, ``bash``, ``text``) is left alone.

When a bundled model a block names (``"tiny-shakespeare"``, ``"tiny-shakespeare-genre"``) is not
installed, the page runs up to that block and is then skipped, with the reason.
"""

import importlib
import inspect
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTED_PAGES = {
    "index.md", "architecture.md", "embedding.md", "rmsnorm.md", "rope.md", "attention.md",
    "swiglu.md", "heads.md", "generation.md", "checkpoints.md", "testing.md", "cli.md",
    "trace.md", "teaching.md", "training.md", "gguf.md",
}
# A bundled model named in a block, as a string literal: "tiny-shakespeare", "tiny-shakespeare-genre".
BUNDLED_NAME = re.compile(r"[\"'](tiny-shakespeare[\w-]*)[\"']")

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(page: Path):
    """(info string, body, line number of the body's first line) for every fenced block."""
    text = page.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start("body")) + 1
        yield match["info"].strip(), match["body"], first_line


def executed_blocks(page: Path):
    return [(body, line) for info, body, line in code_blocks(page) if info == "python"]


def excerpt_blocks(page: Path):
    return [(info.split()[2], body, line) for info, body, line in code_blocks(page)
            if info.startswith("python excerpt ")]


def resolve(dotted: str):
    """llama_np.layers.rms_norm or llama_np.model.LlamaForCausalLM.__call__ -> the object."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {dotted}")


def page_params(select):
    return [pytest.param(page, id=page.name) for page in PAGES if select(page)]


def test_every_planned_page_exists():
    missing = EXPECTED_PAGES - {page.name for page in PAGES}
    assert not missing, f"docs/ lacks {sorted(missing)}"


@pytest.mark.parametrize("page", page_params(lambda page: True))
def test_relative_links_point_to_existing_files(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


@pytest.mark.parametrize("page", page_params(lambda page: excerpt_blocks(page)))
def test_excerpts_match_the_library_source(page):
    for dotted, body, line in excerpt_blocks(page):
        source = textwrap.dedent(inspect.getsource(resolve(dotted)))
        position = 0
        pieces = re.split(r"^[ \t]*\.\.\.[ \t]*\n", body, flags=re.MULTILINE)
        for piece in pieces:
            piece = textwrap.dedent(piece).strip("\n")
            found = source.find(piece, position) if piece else position
            if found < 0:
                found = _find_indented(source, piece, position)
            assert found >= 0, (
                f"{page.name} line {line}: this excerpt of {dotted} is not in the library source "
                f"(in this order); update the page:\n{piece}"
            )
            position = found + len(piece)


def _find_indented(source, piece, start):
    """Find a piece that was dedented on its own (e.g. the body of a method)."""
    for indent in ("    ", "        ", "            "):
        candidate = textwrap.indent(piece, indent)
        found = source.find(candidate, start)
        if found >= 0:
            return found
    return -1


@pytest.mark.parametrize("page", page_params(lambda page: executed_blocks(page)))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from llama_np.formats.locate import bundled_model_names

    installed = set(bundled_model_names())
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{page.stem}"}
    for body, line in executed_blocks(page):
        missing = sorted(set(BUNDLED_NAME.findall(body)) - installed)
        if missing:
            # The blocks before this one have run; the rest need the bundled models.
            pytest.skip(f"{page.name} line {line} on runs the bundled model(s) {missing}, "
                        "not installed in llama_np/assets/")
        # Leading newlines make the line numbers in a traceback those of the Markdown file.
        code = compile("\n" * (line - 1) + body, str(page), "exec")
        exec(code, namespace)


def test_citations_point_inside_the_repository_at_sections_that_exist():
    """Code, docs, notebooks and tests cite docs/reference.md by section ("docs/reference.md §3.9");
    each cited section must be a heading of that page, and no file may cite design notes that
    are not in the repository."""
    root = Path(__file__).resolve().parent.parent
    reference = (root / "docs" / "reference.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", reference, flags=re.MULTILINE))
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    problems = []
    for name in tracked:
        path = root / name
        if name.startswith("tests/data/") or path.suffix not in (".py", ".md", ".ipynb", ".toml", ".txt"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for outside in re.findall(r"\b(?:REFERENCE|DESIGN|STYLE)\.md\b", text):
            problems.append(f"{name} cites {outside}, which is not in the repository")
        for cited in re.findall(r"reference\.md §(\d+(?:\.\d+)?)", text):
            if cited not in sections:
                problems.append(f"{name} cites docs/reference.md §{cited}, which has no such section")
    assert not problems, "\n".join(problems)
