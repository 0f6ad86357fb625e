"""Outputs are complete or absent: atomic_write, atomic_path and written_dir."""

import os
import socket

import pytest

from megatron_lite import files
from megatron_lite.files import (
    FolderInUse,
    FolderLock,
    atomic_path,
    atomic_write,
    written_dir,
)


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "stats.json"
    with atomic_write(path) as f:
        f.write("old\n")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"  # the failed write left the old file alone
    with atomic_write(path, "wb") as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temporaries


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    out = tmp_path / "loss.png"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name != out.name
        assert not out.exists()
        tmp.write_bytes(b"png")
    assert out.read_bytes() == b"png"


def test_written_dir_swaps_whole_folders(tmp_path):
    out = tmp_path / "hf"
    with written_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt), written_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with written_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_full_disk_removes_the_partial_output_and_says_so(tmp_path):
    import errno

    out = tmp_path / "hf"
    for writer in (written_dir, atomic_path):
        with pytest.raises(OSError) as err, writer(out) as tmp:
            (tmp / "a.txt" if writer is written_dir else tmp).write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        assert err.value.errno == errno.ENOSPC
        assert str(err.value) == (f"[Errno 28] No space left on device while writing {out}; "
                                  f"its partial temporary {tmp.name} was removed")
        assert list(tmp_path.iterdir()) == []


def test_two_jobs_taking_over_one_stale_lock_do_not_both_hold_it(tmp_path, monkeypatch):
    """Job B finds a dead job's lock; before B removes it, job A (alive) has taken it over
    and written its own: B must see A's lock and refuse, not delete it and hold too."""
    lock = tmp_path / ".lock"
    host = socket.gethostname()
    lock.write_text(f"{host} 999999999 2026-01-01T00:00:00\n")  # a dead job's
    other = f"{host} {os.getppid()} 2026-01-02T00:00:00\n"  # job A: a live process

    alive = files._alive

    def dead_and_taken_over(pid):  # B checks the dead holder: meanwhile A takes over
        if pid != 999999999:
            return alive(pid)
        lock.unlink(missing_ok=True)
        lock.write_text(other)
        return False

    monkeypatch.setattr(files, "_alive", dead_and_taken_over)
    said = []
    with pytest.raises(FolderInUse, match=f"in use by process {os.getppid()} on {host}"):
        FolderLock(tmp_path, "train.run_dir").acquire(warn=said.append)
    assert lock.read_text() == other and not said
    # a stale lock nobody else takes: taken over, with the warning
    lock.write_text(f"{host} 999999999 2026-01-01T00:00:00\n")
    monkeypatch.setattr(files, "_alive", lambda pid: False)
    mine = FolderLock(tmp_path, "train.run_dir")
    mine.acquire(warn=said.append)
    assert lock.read_text().split()[1] == str(os.getpid()) and len(said) == 1
    mine.release()
    assert not lock.exists()


def test_a_lock_released_after_its_folder_was_removed_leaves_anothers_lock(tmp_path):
    """Preprocessing removes its work folder (lock included) before releasing: a job that
    took the folder in between keeps its lock."""
    folder = tmp_path / "work"
    mine = FolderLock(folder, "--work-dir")
    mine.acquire()
    other = f"{socket.gethostname()} {os.getppid()} 2026-01-02T00:00:00\n"
    (folder / ".lock").write_text(other)  # removed and taken by another job meanwhile
    mine.release()
    assert (folder / ".lock").read_text() == other
