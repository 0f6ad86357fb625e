"""Every command in the README and docs/ runs as written (issue 42), and their links hold.

The slow test runs each page's shell blocks, in page order, in one scratch checkout where
``launch/demo.sh`` and ``launch/demo_bert.sh`` (what ``make demo`` / ``make demo-bert``
run) have built the demo's data; training commands run 2 steps (see
:mod:`tests.docs_commands`). The fast tests check the block extractor itself, the
markers, and every relative link.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.docs_commands import (
    NOT_PAGES,
    PAGES,
    ROOT,
    SHORT,
    Block,
    MarkerError,
    extract,
    make_checkout,
    page_blocks,
    run_block,
)
from tests.docs_commands import failure as block_failure

# ------------------------------------------------------------------ the extractor (fast)

SAMPLE = """\
# A page

```bash
echo one
```

<!-- not tested: needs a GPU -->

```bash
nvidia-smi
```

```python
print("not a command")
```

- a list item:

  ```sh
  echo two \\
      three
  ```

```console
$ echo four
four
$ echo five \\
    six
five six
```

```
plain output, never run
```
"""


def test_extract_finds_the_shell_blocks_and_honours_the_markers():
    blocks = extract(SAMPLE, "p.md")
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (3, "bash", None), (9, "bash", "needs a GPU"), (19, "sh", None), (24, "console", None)]
    assert blocks[0].text == "echo one\n"
    assert blocks[2].text == "echo two \\\n    three\n"       # the list's indent removed
    assert blocks[3].text == "echo four\necho five \\\n    six\n"  # prompts only, no output


@pytest.mark.parametrize("text,problem", [
    ("<!-- not tested: x -->\nsome prose\n```bash\ntrue\n```\n", "with no block"),
    ("<!-- not tested: x -->\n```python\npass\n```\n", "only shell blocks run"),
    ("<!-- not tested: -->\n```bash\ntrue\n```\n", "must say why"),
    ("text\n<!-- not tested: x -->\n", "with no block"),
])
def test_a_misplaced_marker_is_an_error(text, problem):
    with pytest.raises(MarkerError, match=problem):
        extract(text, "p.md")


def test_a_broken_command_fails_and_a_good_one_passes(tmp_path):
    env = make_checkout(tmp_path)
    good = Block("p.md", 1, "bash", "python -c 'print(6 * 7)'\ntest -L configs\n", None)
    proc = run_block(good, tmp_path, env, timeout=60)
    assert proc.returncode == 0 and "42" in proc.stdout, proc.stdout
    # a failing command in the middle of a block fails the block (bash -e), as does a
    # failure on the left of a pipe (pipefail) and a command that does not exist
    for text in ("false\necho after\n", "python -m megatron_lite.no_such_module | cat\n",
                 "megatron-lite-no-such-command\n"):
        proc = run_block(Block("p.md", 1, "bash", text, None), tmp_path, env, timeout=60)
        assert proc.returncode != 0, text
        assert "after" not in proc.stdout
        assert "p.md:1" in block_failure(Block("p.md", 1, "bash", text, None), proc)


def test_the_wrappers_shorten_training_commands_only(tmp_path):
    env = make_checkout(tmp_path)
    show = ("import sys; print(sys.argv[1:])",)
    probe = tmp_path / "probe"
    (probe / "megatron_lite").mkdir(parents=True)
    # a stand-in package shadowing the project's, that prints what it was given
    (probe / "megatron_lite" / "__init__.py").write_text("")
    for name in ("train", "evaluate", "search"):
        (probe / "megatron_lite" / f"{name}.py").write_text(show[0])
    run = dict(env, PYTHONPATH=str(probe))
    out = {}
    for name in ("train", "evaluate", "search"):
        proc = subprocess.run(["python", "-m", f"megatron_lite.{name}", "c.yaml", "x.y=1"],
                              cwd=probe, env=run, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout.strip()
    assert out["train"] == str(["c.yaml", "x.y=1", *SHORT["megatron_lite.train"]])
    assert out["search"] == str(["c.yaml", "x.y=1", *SHORT["megatron_lite.search"]])
    assert out["evaluate"] == str(["c.yaml", "x.y=1"])  # not a training command: as written


# ------------------------------------------------------------------ the pages (fast)


def test_every_page_is_listed_and_its_markers_are_well_formed():
    docs = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - set(NOT_PAGES)
    assert docs == set(PAGES) - {"README.md"}, "a docs/ page missing from PAGES (or gone)"
    blocks = page_blocks()  # raises MarkerError on a stray marker
    runnable = [b for b in blocks if b.skip is None]
    assert len(runnable) >= 20, [b.where for b in blocks]


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out, seen = set(), {}
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_points_to_a_file_and_anchor_that_exist():
    broken = []
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        text_no_code = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in LINK.findall(text_no_code):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_makefile_has_every_target_the_pages_name():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"`make ([a-z][\w-]*)", (ROOT / page).read_text()))
        for block in extract((ROOT / page).read_text(), page):
            named |= set(re.findall(r"^\s*make ([a-z][\w-]*)", block.text, re.M))
    assert named and named <= targets, named - targets


# ------------------------------------------------------------------ the commands (slow)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A scratch checkout after ``make demo`` and ``make demo-bert``: their scripts run
    as they are (training 2 steps); every page then runs in it, in order."""
    work = tmp_path_factory.mktemp("readme") / "megatron-lite"
    env = make_checkout(work)
    for script, out in (("launch/demo.sh", "runs/demo"),
                        ("launch/demo_bert.sh", "runs/demo-bert")):
        demo = Block(script, 1, "bash", f"bash {script} {out}\n", None)
        started = time.monotonic()
        proc = run_block(demo, work, env, timeout=600)
        assert proc.returncode == 0, block_failure(demo, proc)
        print(f"{script}: {time.monotonic() - started:.0f} s")
    return work, env


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs_as_written(page, checkout):
    work, env = checkout
    blocks = extract((ROOT / page).read_text(), page)
    skipped = [b for b in blocks if b.skip]
    for b in skipped:
        print(f"not tested  {b.where}: {b.skip}")
    ran = 0
    for block in blocks:
        if block.skip:
            continue
        started = time.monotonic()
        proc = run_block(block, work, env)
        assert proc.returncode == 0, block_failure(block, proc)
        ran += 1
        print(f"ran         {block.where} in {time.monotonic() - started:.0f} s")
    print(f"{page}: {ran} blocks ran, {len(skipped)} not tested")

