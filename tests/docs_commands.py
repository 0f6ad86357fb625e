"""The shell blocks of README.md and docs/*.md, and how the README-runs test runs them.

A fenced block whose language is ``bash``, ``sh``, ``shell`` or ``console`` is a command a
reader types (``console``: only its ``$ `` lines and their continuations). A block that
cannot run on this machine is marked in the markdown right before it (blank lines may
stand between) with ``<!-- not tested: REASON -->``; the test counts and lists those.

The commands run as written, in page order, in one scratch folder that looks like a
checkout after ``make demo`` (``configs/``, ``launch/``, ``bench/`` linked, the demo's data
built by ``launch/demo.sh`` itself). The only change is the step count: ``python``,
``.venv/bin/python`` and ``torchrun`` there are small wrappers (:func:`write_wrappers`)
that append :data:`SHORT` to the commands that train (``megatron_lite.train``,
``.search``, ``.distill``, ``.launch``): later overrides win, so a page's
``train.max_steps=300`` becomes 2 steps, and nothing else about the command changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# README first, then the pages in the order the README's map lists them: a later page
# may use what an earlier one wrote (the BERT run the distillation example reads).
PAGES = ("README.md", "docs/preprocessing.md", "docs/training.md", "docs/variants.md",
         "docs/evaluation.md", "docs/launching.md", "docs/benchmarks.md", "docs/code.md")
NOT_PAGES = ("docs/results.md",)  # the lead's generated results page: no commands to run
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARK = re.compile(r"^\s*<!--\s*not tested:\s*(?P<reason>.*?)\s*-->\s*$")
# the training commands get a couple of steps, no evaluation during training
SHORT = {
    "megatron_lite.train": ["train.max_steps=2", "train.eval_interval=0"],
    "megatron_lite.launch": ["train.max_steps=2", "train.eval_interval=0"],
    "megatron_lite.distill": ["train.max_steps=2", "train.eval_interval=0"],
    # the search refuses max_steps <= freeze_steps (issue 42): freeze 1 step, search 2
    "megatron_lite.search": ["train.max_steps=3", "train.eval_interval=0",
                             "search.freeze_steps=1"],
}


@dataclass
class Block:
    page: str
    line: int          # of the opening fence, 1-based
    lang: str
    text: str          # the commands (console: prompts stripped, output dropped)
    skip: str | None   # the marker's reason, or None: the block runs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


class MarkerError(ValueError):
    pass


def _console_commands(lines: list[str]) -> list[str]:
    out, going_on = [], False
    for line in lines:
        if line.startswith("$ "):
            out.append(line[2:])
        elif going_on:
            out.append(line)
        else:
            continue
        going_on = line.rstrip().endswith("\\")
    return out


def extract(text: str, page: str) -> list[Block]:
    """Every shell block of one markdown text, with its marker. A marker not followed by a
    shell block (only blank lines between) is an error: it would silently skip nothing."""
    lines = text.splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        mark = MARK.match(line)
        fence = FENCE.match(line)
        if mark:
            if pending is not None:
                raise MarkerError(f"{page}:{pending[1]}: a 'not tested' marker with no block")
            if not mark["reason"]:
                raise MarkerError(f"{page}:{i + 1}: a 'not tested' marker must say why")
            pending = (mark["reason"], i + 1)
        elif fence:
            indent, lang, start = fence["indent"], fence["lang"].lower(), i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            if lang in SHELL:
                if lang == "console":
                    body = _console_commands(body)
                blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n",
                                    pending[0] if pending else None))
            elif pending is not None:
                raise MarkerError(f"{page}:{pending[1]}: a 'not tested' marker before a "
                                  f"{lang or 'plain'} block (only shell blocks run)")
            pending = None
        elif line.strip() and pending is not None:
            raise MarkerError(f"{page}:{pending[1]}: a 'not tested' marker with no block")
        i += 1
    if pending is not None:
        raise MarkerError(f"{page}:{pending[1]}: a 'not tested' marker with no block")
    return blocks


def page_blocks(root: Path = ROOT) -> list[Block]:
    blocks = []
    for page in PAGES:
        blocks += extract((root / page).read_text(), page)
    return blocks


WRAPPER = '''#!{python}
"""The README-runs test's stand-in for {name}: the same command, with a couple of steps."""
import os, sys
SHORT = {short!r}
args = sys.argv[1:]
module = None
for i, a in enumerate(args[:-1]):
    if a == "-m":
        module = args[i + 1]
        if module != "megatron_lite.launch":  # launch: the train module after it decides
            break
extra = SHORT.get(module, []) if "-c" not in args[:1] else []
os.execv({real!r}, [{real!r}, *args, *extra])
'''


def write_wrappers(bin_dir: Path) -> None:
    """``python`` and ``torchrun`` in ``bin_dir`` that run this venv's with :data:`SHORT`
    appended to training commands."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    real_bin = Path(sys.executable).parent
    for name in ("python", "python3", "torchrun"):
        real = str(real_bin / name) if name != "python3" else sys.executable
        path = bin_dir / name
        path.write_text(WRAPPER.format(python=sys.executable, name=name, short=SHORT,
                                       real=real))
        path.chmod(0o755)


def make_checkout(work: Path, root: Path = ROOT) -> dict[str, str]:
    """A scratch folder that reads like a checkout: the project's configs, launch scripts
    and benchmarks linked, ``.venv/bin`` the wrappers; returns the environment to run in."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "launch", "bench"):
        if not (work / name).exists():
            (work / name).symlink_to(root / name)
    bin_dir = work / ".venv" / "bin"
    write_wrappers(bin_dir)
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="offline", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = 420):
    """Run one block with ``bash -eo pipefail`` (a failing command fails the block);
    returns the CompletedProcess (stdout and stderr together)."""
    return subprocess.run(["bash", "-eo", "pipefail", "-c", block.text], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def failure(block: Block, proc) -> str:
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    return (f"{block.where}: the {block.lang} block exited {proc.returncode}\n"
            f"--- block ---\n{block.text}--- output (last 40 lines) ---\n{tail}")


def clean(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
