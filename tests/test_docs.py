"""Every Python example of README.md and of the documentation site (docs/**/*.md) runs here, on a CPU.

The rule: the ```python fenced blocks of one page run in order, in one namespace, in this process, in a
temporary working directory of that page's own (files an example writes land there). A page reads as one
script cut into pieces: a later block may use what an earlier block of the same page defined, never what
another page defined. Each block is a test of its own (``README.md#2`` is the README's second Python
block); running one block alone runs the blocks before it first.

A block that needs a CUDA GPU or a long run is tagged on the line just before its fence:

    <!-- skip: needs a CUDA GPU -->
    ```python

and its test is skipped with that reason; a block tagged `needs a CUDA GPU` runs where torch sees one.
Any other block that raises fails its test, and the blocks
after it on that page fail too. Fences of other languages (bash, console) and indented code are not run.
"""

import re
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP_TAG = re.compile(r"^<!--\s*skip:\s*(.*?)\s*-->[ \t]*$")
NEEDS_CUDA = "needs a CUDA GPU"


def pages():
    """README.md, then the site's pages in path order (relative paths)."""
    found = [REPO / "README.md"] if (REPO / "README.md").is_file() else []
    if DOCS.is_dir():
        found += sorted(DOCS.rglob("*.md"))
    return found


def blocks(path):
    """The Python blocks of one page: (code, first line number, skip reason or None)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        tag = SKIP_TAG.match(before)
        found.append((match.group(1), line + 1, tag.group(1) if tag else None))
    return found


def cases():
    params = []
    for path in pages():
        name = path.relative_to(REPO).as_posix()
        for index, _ in enumerate(blocks(path), 1):
            params.append(pytest.param(name, index, id=f"{name}#{index}"))
    return params


class Page:
    """One page's namespace, working directory and progress through its blocks."""

    def __init__(self, workdir):
        self.namespace = {"__name__": "__docs__"}
        self.workdir = workdir
        self.done = 0            # blocks run (or skipped) so far
        self.failed = None       # "name#index" of the first block that raised


STATE = {}


@pytest.mark.parametrize("page, index", cases())
def test_example_runs_as_written(page, index, tmp_path_factory, monkeypatch):
    page_blocks = blocks(REPO / page)
    state = STATE.get(page)
    if state is None:
        state = STATE[page] = Page(tmp_path_factory.mktemp(re.sub(r"\W", "_", page)))
    monkeypatch.chdir(state.workdir)
    while state.done < index:
        code, line, skip = page_blocks[state.done]
        state.done += 1
        current = state.done == index
        if state.failed is not None:
            pytest.fail(f"{state.failed} raised, and the blocks after it on the page use what it defines")
        if skip is not None and not (skip.startswith(NEEDS_CUDA) and torch.cuda.is_available()):
            if current:
                pytest.skip(f"{page}#{index} (line {line}): {skip}")
            continue
        try:
            # Line numbers in tracebacks are the page's: pad the block down to where it starts.
            exec(compile("\n" * (line - 1) + code, str(REPO / page), "exec"), state.namespace)
        except BaseException:
            state.failed = f"{page}#{state.done}"
            if current:
                raise
            pytest.fail(f"{page}#{state.done} (line {line}), run before #{index}, raised:\n"
                        f"{traceback.format_exc()}")


def test_skip_tags_stand_before_a_python_fence_and_give_a_reason():
    """A tag that is misspelt or not right above a Python fence would silently skip nothing or the wrong
    block; a tag without a reason says nothing to the reader."""
    problems = []
    for path in pages():
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if not re.match(r"<!--\s*skip", line.strip()):   # a tag stands alone on its line
                continue
            tag = SKIP_TAG.match(line.strip())
            following = lines[number] if number < len(lines) else ""
            if tag is None or not tag.group(1):
                problems.append(f"{path.name}:{number}: not `<!-- skip: REASON -->`: {line.strip()}")
            elif not following.startswith("```python"):
                problems.append(f"{path.name}:{number}: the next line is not a ```python fence")
    assert not problems, "\n".join(problems)


def test_the_readme_has_its_two_complete_quick_starts():
    readme = REPO / "README.md"
    found = blocks(readme)
    assert len(found) >= 2 and all(skip is None for _, _, skip in found[:2])
    functional, peft_route = found[0][0], found[1][0]
    for call in ("add_adapters", "save_adapter", "load_adapter", "merge_and_unload"):
        assert f"moslora_ext.{call}(" in functional
    for text in ("import moslora_ext", "get_peft_model(", "save_pretrained(", "PeftModel.from_pretrained(",
                 "from trl import", "SFTTrainer(", "peft_config=moslora_ext.MoSLoRAConfig(", "max_steps=1"):
        assert text in peft_route


def test_the_readmes_links_into_docs_name_existing_pages():
    """mkdocs build --strict checks the site's own links; the README is not part of the site."""
    if not DOCS.is_dir():
        pytest.skip("no docs/ folder beside this copy of the tests")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets, "the README links to no page of docs/"
    missing = sorted({target for target in targets if not (REPO / target).is_file()})
    assert not missing, f"README.md links to pages that do not exist: {missing}"
