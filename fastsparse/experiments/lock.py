"""The run-folder lock: one process at a time trains a run folder.

``<run folder>/run.lock`` holds ``{"pid", "host", "started"}`` of the process training it, and that
process holds an exclusive ``flock`` on it until it ends; the kernel drops the ``flock`` when the
process dies, however it dies, so a lock file nobody holds is stale: the next run takes it over
with a warning that names the process that left it. A second run while the lock is held is
refused with :class:`RunLocked`, before it reads or writes anything in the folder. Under torchrun
only rank 0 takes the lock; every rank learns whether it got it and all refuse together.
Where ``flock`` is not available, the file's pid decides: a live process on this host holds it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .experiment import ranks
from .rundir import RunFolderBlocked, RunFolderError

__all__ = ["LOCK_NAME", "RunLocked", "RunLock", "hold_run_folder"]

LOCK_NAME = "run.lock"
log = logging.getLogger("fastsparse.train")

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class RunLocked(RunFolderBlocked):
    """Another live process is training this run folder."""


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, another user's
        return True
    return True


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"


class RunLock:
    """The lock of one run folder; :meth:`acquire` raises :class:`RunLocked` when a live process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(10):   # another process may remove the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            info = _read(fd)
            try:
                self._lock(fd, info)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)   # the file we locked was removed by the holder that just finished: again
        else:  # pragma: no cover - ten races in a row
            raise RunLocked(f"{self.path.parent} is being locked and unlocked by other processes; try again")
        if info and info.get("pid") != os.getpid():
            log.warning("%s: taking over the lock left by %s (that process is gone)", self.path.parent, _who(info))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._fd = fd

    def _lock(self, fd: int, info: dict[str, Any]) -> None:
        refused = RunLocked(f"{self.path.parent} is being trained by {_who(info)}: wait for that run to end or "
                            f"stop it; two runs in one folder would mix their logs and checkpoints")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise refused from None
            except OSError:   # a file system without flock: fall back to the pid
                pass
        if info.get("host") == socket.gethostname() and info.get("pid") != os.getpid() and _pid_alive(info.get("pid")):
            raise refused

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)   # while still holding it: the next run creates a fresh file
        except OSError:
            pass
        os.close(self._fd)   # drops the flock
        self._fd = None


def _agree(ok: bool) -> bool:
    """True on every rank when rank 0 got the lock."""
    if ranks()[1] <= 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` and hold its lock (rank 0) for the body; raise :class:`RunFolderError` on
    every rank when the folder cannot be created or is locked."""
    lock, error = None, None
    if ranks()[0] == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocking = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), run_dir)
            error = RunFolderBlocked(f"cannot create the run folder {run_dir}: {blocking} is a file, not a folder; "
                                   "pass --out a folder")
        except OSError as e:
            error = RunFolderError(f"cannot create the run folder {run_dir}: {e.strerror or e}")
        if error is None:
            lock = RunLock(run_dir)
            try:
                lock.acquire()
            except RunFolderError as e:
                error, lock = e, None
            except OSError as e:
                error, lock = RunFolderError(f"cannot lock {run_dir}: {e.strerror or e}"), None
    if not _agree(error is None):
        raise error if error is not None else RunLocked(f"rank 0 could not create or lock {run_dir}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
