"""Files that are either complete or absent: write under a temporary name, then rename.

One rule for every output of megatron-lite and its preprocessing (configs, index caches,
stats, metrics plots, shards, tokenizer files, checkpoints, conversions):

1. write the data under a temporary name next to the final one (same filesystem; a
   hidden ``.NAME.tmp``, see :func:`temp_name`);
2. fsync the data (every file of a folder);
3. ``os.replace`` it onto the final name (atomic on POSIX);
4. fsync the parent directory, so the rename itself survives a power loss.

A crash at any point leaves either the old complete output or the new one, never a
half-written file under the final name. On an error the temporary is removed.

    with atomic_write(path) as f:           # a text (or "wb": binary) file object
        f.write(text)
    with atomic_path(path) as tmp:          # for writers that want a path (savefig, ...)
        fig.savefig(tmp)
    with written_dir(folder) as tmp:        # a whole folder, replaced in one rename
        torch.save(state, tmp / "model.pt")
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path`` and the directories holding them."""
    path = Path(path)
    for f in sorted(path.rglob("*")):
        fsync_path(f)
    fsync_path(path)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Steps 2-4 of the rule: fsync ``tmp`` (a file or a folder), rename it onto ``final``,
    fsync the parent. A folder already at ``final`` is moved aside first and deleted only
    after the rename, so some complete copy exists at every moment."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        fsync_tree(tmp)
        old = final.with_name(f".old_{final.name}")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)


def temp_name(final: str | Path, unique: bool = False) -> Path:
    """The temporary name of ``final``: a hidden sibling ``.NAME.tmp``, so globs of the
    outputs skip it; with ``unique``, ``.NAME.<pid>-<random>.tmp``, so two processes
    writing the same output at once (two jobs building one index cache) never share one."""
    final = Path(final)
    tag = f".{os.getpid()}-{secrets.token_hex(4)}" if unique else ""
    return final.with_name(f".{final.name}{tag}.tmp")


def _disk_full(err: BaseException, final: Path, tmp: Path) -> None:
    """A full disk (or quota) while writing ``final``: raise it again as one line that
    says the partial temporary was removed (other errors go on as they are)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(err.errno, f"{err.strerror} while writing {final}; its partial "
                                 f"temporary {tmp.name} was removed") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; published when the block succeeds."""
    path = Path(path)
    tmp = temp_name(path, unique=True)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _disk_full(err, path, tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"
                 ) -> Iterator[IO]:
    """Yield an open file (``mode`` "w" or "wb") that replaces ``path`` when the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


@contextlib.contextmanager
def written_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces the folder ``out`` when the block succeeds.

    On an error the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    tmp = temp_name(out, unique=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _disk_full(err, out, tmp)
        raise


class FolderInUse(ValueError):
    """A folder another live job holds (one line: who, since when)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """One job per folder: ``FOLDER/.lock`` holds the host, PID and start time of the job
    that took it (created exclusively, before anything else is written there), removed
    by :meth:`release`. A lock left by a dead process of this host is taken over, with
    ``warning`` said; a live holder (or one on another host) is a :class:`FolderInUse`
    naming it. ``what`` names the folder in messages (``train.run_dir``...)."""

    def __init__(self, folder: str | Path, what: str):
        self.path, self.what, self.held = Path(folder) / ".lock", what, False
        self.made = False  # the folder was created for the lock (removed again if empty)

    def acquire(self, warn=print) -> None:
        self.made = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        for _ in range(3):  # a stale lock removed between two tries: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, pid, since = (self._read() + ["?", "?", "?"])[:3]
                if host == socket.gethostname() and pid == str(os.getpid()):
                    self.path.unlink(missing_ok=True)  # this process's, not released
                    continue
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    warn(f"warning: {self.path.parent} was held by process {pid} (since "
                         f"{since}), which is gone; taking it over")
                    self.path.unlink(missing_ok=True)
                    continue
                raise FolderInUse(
                    f"{self.what}={self.path.parent} is in use by process {pid} on {host} "
                    f"(since {since}): one job per folder; wait for it, or use another "
                    f"(delete {self.path} if that job is gone)") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return
        raise FolderInUse(f"{self.what}={self.path.parent}: could not take {self.path}")

    def _read(self) -> list[str]:
        try:
            return self.path.read_text().split()
        except OSError:
            return []

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made:  # a job that stopped before writing anything leaves no folder
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
