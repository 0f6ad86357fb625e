"""The sharded stages on datatrove's executors against the one-process path and against
an independent reference (datasketch's LSH index + exact Jaccard, document by document)."""

import json
import random

import pytest

from preprocessing import stages
from preprocessing.__main__ import main
from preprocessing.dedup import NearDuplicateIndex, as32, jaccard, minhash, shingle_hashes
from preprocessing.normalize import normalize
from tests.conftest import mutate
from tests.preprocessing.test_pipeline import _args


def _window(words, start, n=300):
    return " ".join(words[start:start + n])


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory, stdlib_docs):
    """Five jsonl files (so five shards at --tasks 5) with: originals; 1-3 % mutations of
    them placed in later files; a cluster of 25 identical copies spread over every file;
    a non-transitive triple A~B, A~C, B!~C (A first, B and C in other files); 'far'
    variants (>= 40 % changed) that must stay."""
    rng = random.Random(0)
    originals = stdlib_docs[:60]
    docs = [(t, "original") for t in originals]
    docs += [(mutate(t, 0.01 + 0.01 * (k % 3), k), "near") for k, t in enumerate(originals[:30])]
    docs += [(mutate(t, 0.45, 100 + k), "far") for k, t in enumerate(originals[30:45])]
    docs += [(stdlib_docs[61], "copy")] * 25
    words = " ".join(stdlib_docs[62:66]).split()
    a, b, c = _window(words, 40), _window(words, 0), _window(words, 80)
    sets = [as32(shingle_hashes(t)) for t in (a, b, c)]
    assert jaccard(sets[0], sets[1]) >= 0.7 and jaccard(sets[0], sets[2]) >= 0.7
    assert jaccard(sets[1], sets[2]) < 0.7
    head = docs[:3] + [(a, "A")]
    tail = docs[3:] + [(b, "B"), (c, "C")]
    rng.shuffle(tail)
    docs = head + tail
    folder = tmp_path_factory.mktemp("planted")
    files = [folder / f"part{i}.jsonl" for i in range(5)]
    per = -(-len(docs) // 5)
    for i, path in enumerate(files):
        with open(path, "w") as f:
            for text, _ in docs[i * per:(i + 1) * per]:
                f.write(json.dumps({"text": text}) + "\n")
    return files, docs


def _read(prefix):
    return {ext: open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")}


def _counts(stats_path):
    stats = json.loads(stats_path.read_text())
    return {k: v for k, v in stats.items() if k not in ("seconds", "output_prefix")}


def _audit(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_clusters(files):
    """datasketch LSH over every document in input order (no shards), exact Jaccard."""
    index, wheres = NearDuplicateIndex(0.7), []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            sh = shingle_hashes(normalize(json.loads(line)["text"]))
            index.add(minhash(sh), as32(sh))
            wheres.append(f"{path}:{n}")
    return [{"kept": wheres[k], "removed": [wheres[r] for r in v]}
            for k, v in sorted(index.clusters().items())]


def test_any_executor_and_task_count_gives_the_same_bytes_and_clusters(
        tmp_path, bpe_files, planted_files, capsys):
    files, docs = planted_files
    runs = {"single": [], "local3": ["--executor", "local", "--tasks", "3"],
            "local5": ["--executor", "local", "--tasks", "5"]}
    for name, extra in runs.items():
        argv = _args(tmp_path, files, bpe_files, "--min-tokens", "1", "--write-duplicates",
                     "--append-eod", *extra, prefix=name)
        if name == "local5":
            argv.remove("--quiet")  # progress lines, and 2 tasks at once
            argv[argv.index("--workers") + 1] = "2"
        assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("prepare 5/5 tasks", "candidates 5/5", "verify 5/5", "components 1/1",
                  "write 5/5"):
        assert f"text: {stage}" in out, out
    blobs = {name: _read(tmp_path / f"{name}_text_document") for name in runs}
    assert blobs["single"] == blobs["local3"] == blobs["local5"]
    counts = {name: _counts(tmp_path / f"{name}.stats.json") for name in runs}
    assert counts["single"] == counts["local3"] == counts["local5"]
    audits = {name: _audit(tmp_path / f"{name}_text_document.duplicates.jsonl") for name in runs}
    assert audits["single"] == audits["local3"] == audits["local5"]

    # the same clusters as the datasketch index over the whole corpus
    assert audits["single"] == _reference_clusters(files)
    kind = {}
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            kind[f"{path}:{n}"] = next(k for t, k in docs if t == json.loads(line)["text"])
    removed = [kind[w] for c in audits["single"] for w in c["removed"]]
    kept = [kind[c["kept"]] for c in audits["single"]]
    # each original/near pair loses its later member (the shuffle puts some near first)
    assert removed.count("copy") == 24 and removed.count("near") + removed.count("original") == 30
    assert sorted(k for k in removed if k in "ABC") == ["B", "C"] and "A" in kept
    assert "far" not in removed
    assert counts["single"]["duplicates_removed"] == len(removed)
    # nothing left behind but the outputs (work folders: deleted, or kept with logs only)
    assert not list(tmp_path.glob(".*"))
    assert sorted(p.name for p in (tmp_path / "local3.work").iterdir()) == ["logs"]


def test_a_rerun_after_a_kill_continues_from_completed_tasks(tmp_path, bpe_files,
                                                              planted_files, monkeypatch):
    files, _ = planted_files
    argv = _args(tmp_path, files, bpe_files, "--min-tokens", "1", "--executor", "local",
                 "--tasks", "3", prefix="killed")
    real_verify, calls = stages.verify, []

    def killed_in_verify(plan, key, task, world):
        if task == 1:
            raise KeyboardInterrupt
        real_verify(plan, key, task, world)

    monkeypatch.setattr(stages, "verify", killed_in_verify)
    assert main(argv) == 130
    assert not list(tmp_path.glob("killed_*"))  # no output that looks complete
    monkeypatch.setattr(stages, "verify", real_verify)
    real_prepare = stages.prepare
    monkeypatch.setattr(stages, "prepare", lambda *a: calls.append(a) or real_prepare(*a))
    assert main(argv) == 0
    assert calls == []  # the prepare tasks were not redone
    assert main(_args(tmp_path, files, bpe_files, "--min-tokens", "1", prefix="whole")) == 0
    assert _read(tmp_path / "killed_text_document") == _read(tmp_path / "whole_text_document")


def test_a_work_dir_of_an_unfinished_run_with_other_options_is_refused(
        tmp_path, bpe_files, planted_files, capsys, monkeypatch):
    files, _ = planted_files
    work = tmp_path / "w"
    base = ["--executor", "local", "--tasks", "2", "--work-dir", str(work)]
    monkeypatch.setattr(stages, "verify", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(_args(tmp_path, files[:2], bpe_files, *base)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(_args(tmp_path, files[:2], bpe_files, *base, "--min-tokens", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --work-dir {work} holds a run with other") and "\n" not in err
    assert main(_args(tmp_path, files[:2], bpe_files, *base)) == 0  # the same options: fine
    assert sorted(p.name for p in work.iterdir()) == ["logs"]  # finished: logs only
    assert main(_args(tmp_path, files[:2], bpe_files, *base, "--min-tokens", "5")) == 0
    foreign = tmp_path / "data"
    (foreign / "text").mkdir(parents=True)
    argv = _args(tmp_path, files[:2], bpe_files, "--executor", "local", "--work-dir",
                 str(foreign))
    assert main(argv) == 2 and (foreign / "text").is_dir()
    assert "is not empty and was not made by python -m preprocessing" in capsys.readouterr().err


def test_an_oversized_bucket_is_one_clear_error(tmp_path, bpe_files, stdlib_docs, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": mutate(stdlib_docs[0], 0.005, k)}) + "\n"
                           for k in range(4)))
    assert main(_args(tmp_path, [src], bpe_files, "--max-bucket", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "different documents share one bucket (more than --max-bucket 2" in err
    assert "\n" not in err and not list(tmp_path.glob("out*"))


def test_records_without_the_key_are_counted_skips(tmp_path, bpe_files, stdlib_docs):
    src = tmp_path / "in.jsonl"
    lines = [{"text": t} for t in stdlib_docs[:6]]
    lines[1], lines[4] = {"body": "x"}, {"title": "y"}
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(_args(tmp_path, [src], bpe_files, "--executor", "local")) == 0
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["skipped"] == {"missing_key": 2} and stats["documents_written"] == 4
    assert stats["first_errors"] == [f"{src}:2: missing_key", f"{src}:5: missing_key"]
    assert stats["documents_read"] == 6
