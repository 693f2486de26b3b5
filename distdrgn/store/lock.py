"""An exclusive lock on an ingest's output, so two ingests never write the same store.

The lock is ``fcntl.flock`` on ``OUT.lock``, a small file beside the output (``OUT`` and
``OUT.partial`` are renamed and removed by the ingest, so neither can carry it). The file
holds the holder's pid, host and start time, for the message the second ingest prints.

* The kernel drops the lock when its holder exits, however it exits (even SIGKILL), so a
  crashed ingest never leaves a stale lock; a leftover ``OUT.lock`` without a holder is simply
  taken over.
* The holder removes the file before releasing the lock. A process that opened the old file
  in the meantime notices (its file is no longer the one at the path) and tries again, so two
  processes can never both believe they hold it.
* Network file systems: on Linux NFS clients (2.6.12 and later) ``flock`` is carried out as a
  whole-file POSIX lock through the NFS lock manager (NFSv4 or lockd with v3), so it excludes
  ingests on other hosts too. Lustre honours it across clients only when mounted with
  ``-o flock``; with ``-o localflock`` it excludes ingests on the same node only, and with
  neither the call fails: the ingest then goes on without a lock after a warning (refusing
  would make ingest unusable there). Always true: two ingests on the same host exclude each
  other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path

from distdrgn.errors import StoreError

LOCK_SUFFIX = ".lock"


def lock_path(out: Path) -> Path:
    """The lock file of the ingest writing ``out``."""
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def _holder(path: Path) -> str:
    """'pid P on host H since T' from the lock file, or '' when it says nothing readable."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class OutputLock:
    """``with OutputLock(out):`` holds the exclusive lock of ``out`` (StoreError if another holds it)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"{self.out}: cannot create the lock file {self.path} "
                                 f"({exc.strerror or exc}); is {self.path.parent} a writable folder?") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _holder(self.path)
                    raise StoreError(f"{self.out}: another ingest is writing this output "
                                     f"({holder or 'holder unknown'}; lock {self.path}); wait for it to finish, "
                                     "or stop it and re-run this command to resume") from None
                # the file system does not support flock (e.g. Lustre without -o flock)
                print(f"warning: {self.path}: cannot lock ({exc.strerror or exc}); make sure no other ingest "
                      f"writes {self.out} at the same time", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        info = {"pid": os.getpid(), "host": platform.node(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding the lock: see the module docstring
        except FileNotFoundError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None
