"""One writer at a time, per teacher cache and per run directory.

The lock is an advisory `flock` on `<dir>/.kdpipe.lock`, which names its holder (pid, host, command).
The kernel drops a flock when its process dies, however it dies, so a lock left by a killed process
is stale by construction: the next writer takes it over and says whose it was. A second live writer
stops at once with the holder's pid and host. (flock works on local disks and on NFSv4; on file
systems without it, kdpipe says so instead of running unlocked.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from kdpipe.errors import UserError

LOCK_NAME = ".kdpipe.lock"


class DirectoryLock:
    """Hold the write lock of `directory` (created if missing) while in use; `what` names it in errors."""

    def __init__(self, directory: str | Path, what: str):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created = False  # the directory was made for this lock: removed again if left empty
        self.took_over: dict | None = None  # the holder of a stale lock this one replaced

    def acquire(self) -> "DirectoryLock":
        if self._fd is not None:
            return self
        self._created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{self.directory} cannot be a directory (a file is in the way): choose another path") \
                from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{self.what} {self.directory} is in use by {describe(holder(self.path))}: "
                                    f"wait for it to finish (or stop it); one writer at a time") from None
                raise UserError(f"cannot lock {self.path} ({exc.strerror}): kdpipe needs a file system with "
                                f"flock (a local disk or NFSv4) to keep two writers apart") from None
            # the holder may have removed the file between our open and our lock: lock the file that is there
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = holder(self.path)
        if previous:
            self.took_over = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv[:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # unlinked while held, so no one can lock the old file after us
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.directory.rmdir()  # nothing was written: leave no empty directory behind
            except OSError:
                pass

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> dict | None:
    """Who wrote the lock file (it may be stale); None when empty or unreadable."""
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(record: dict | None) -> str:
    if not record:
        return "another process"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} (since {record.get('since', '?')}: "
            f"{record.get('command', '?')})")
