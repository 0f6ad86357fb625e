"""Outputs are complete or absent: atomic_write, atomic_path and written_dir."""

import pytest

from megatron_lite.files import atomic_path, atomic_write, written_dir


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
