"""Preprocessing under faults, each built here (issue 41): two runs on one work folder,
a killed sharded run, a huge document."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import mutate

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _command(inputs, prefix, bpe_files, *extra):
    vocab, merges = bpe_files
    return [sys.executable, "-m", "preprocessing", "--input", *map(str, inputs),
            "--output-prefix", str(prefix), "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(vocab), "--merge-file", str(merges), "--quiet", *extra]


def test_a_second_run_on_the_same_output_prefix_is_refused_while_the_first_lives(
        tmp_path, bpe_files, corpus_file):
    """Two real processes, one --output-prefix: the first is frozen (SIGSTOP) once it holds
    the work folder; the second is one line naming it and writes nothing; the first, let
    go, finishes and releases the folder."""
    prefix = tmp_path / "out"
    cmd = _command([corpus_file], prefix, bpe_files, "--workers", "1")
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / ".out.work" / ".lock"
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        assert lock.exists() and first.poll() is None
        second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    err = second.stderr.strip()
    assert err.startswith(f"error: the work folder of --output-prefix={lock.parent} is in use "
                          f"by process {first.pid} on "), err
    assert "\n" not in err and second.stdout == ""
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert (tmp_path / "out_text_document.bin").exists()
    assert not lock.parent.exists()  # released, and the hidden folder removed


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_sharded_preprocessing_leaves_no_worker_and_one_line(tmp_path, bpe_files,
                                                                     stdlib_docs, sig):
    """``--executor local --workers 2`` killed while its prepare tasks run: every process
    it started (task processes, datatrove's Manager, the forkserver) is gone within
    seconds; SIGTERM ends in the one interrupted line, SIGKILL in no output at all."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):  # ~1.5 MB each: a prepare task takes seconds
        _jsonl(inputs / f"part{i}.jsonl", [mutate(stdlib_docs[k % len(stdlib_docs)], 0.3, k)
                                           for k in range(i, 300 + i)])
    cmd = _command([inputs], tmp_path / "out", bpe_files, "--executor", "local",
                   "--workers", "2", "--tasks", "2")
    run = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        task_logs = tmp_path / "out.work" / "logs" / "text" / "prepare" / "logs"
        deadline = time.monotonic() + 120
        while not list(task_logs.glob("task_*")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.01)
        helpers = _descendants(run.pid)
        assert len(helpers) >= 4  # Manager, resource tracker, forkserver, task processes
        run.send_signal(sig)
        out, _ = run.communicate(timeout=60)  # helpers holding its stdout would block this
        gone = time.monotonic()
        while any(map(_alive, helpers)) and time.monotonic() < gone + 5:
            time.sleep(0.05)
        assert not [p for p in helpers if _alive(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert run.returncode == 130
        assert out == ("interrupted: no output written; rerun the same command to continue "
                       f"from {tmp_path / 'out.work'}\n")
    else:
        assert run.returncode == -signal.SIGKILL and out == ""


def test_a_huge_document_is_tokenized_and_hashed_in_pieces_to_the_same_result(
        bpe_files, wordpiece_file, stdlib_docs, monkeypatch):
    """The pieces that bound a huge document's memory (bench/preprocess_memory.py) change
    nothing: the ids of the tokenizer given the whole text, the shingle hashes of one run
    over all of it; cut small here so a ~300 kB text is many pieces, its spacing varied
    (double spaces, newlines, tabs, punctuation) where the cuts may fall; and a run of
    one shingle at a time."""
    from megatron_lite.data.tokenizer import build_tokenizer
    from preprocessing import dedup, workers

    seps = [" ", "  ", "\n", " \t ", ", ", ".\n\n", " - "]
    words = " ".join(stdlib_docs[:12]).split()
    text = "".join(w + seps[i % 7 if i % 5 == 0 else 0] for i, w in enumerate(words))
    vocab, merges = bpe_files
    whole = dedup.shingle_hashes(text)
    for tok in (build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges)),
                build_tokenizer("BertWordPieceLowerCase", str(wordpiece_file))):
        reference = [tok.encode(t) for t in (text, "short", "")]
        monkeypatch.setattr(workers, "PIECE_CHARS", 1000)
        assert len(workers.text_pieces(text, tok.kind)) > 50
        got = workers.encode_texts(tok, [text, "short", ""])
        monkeypatch.undo()
        assert [g.tolist() for g in got] == reference
    monkeypatch.setattr(dedup, "SHINGLE_RUN", 1000)
    assert len(whole) > 5 * 1000 and (dedup.shingle_hashes(text) == whole).all()
    small = text[:3000]
    monkeypatch.undo()
    reference = dedup.shingle_hashes(small)
    monkeypatch.setattr(dedup, "SHINGLE_RUN", 1)
    assert len(reference) > 100 and (dedup.shingle_hashes(small) == reference).all()
