"""A run's hold on its output directory: one writer at a time, and never another run's results.

Lightning's conventions: loggers give every run a fresh ``version_N`` directory, and
``ModelCheckpoint`` names a file that would overwrite another ``<name>-v1``, ``-v2``, ... An
``output_dir`` the user chose is read by name (``<output_dir>/step=N``), so a run is never
redirected from it: a new run that finds another run's results there is refused at set-up with what
to do instead (resume that run, choose another directory, or move the old results away). The default
directory (``<log_dir>/influence``, not versioned when the logger is W&B or absent) is chosen by
the library, so it is versioned instead: a new run takes the next free ``influence-vN``, and a
resumed run finds the directory holding its own results. What decides "another run" is the run id
each result records (``meta["run"]["id"]``), made once per run and kept in its checkpoints.

One writer at a time: the owner holds an exclusive ``flock`` on ``<output_dir>/.lightning-influence.lock``
for as long as it writes, and the file names its process id and host for the message a second
writer gets. The kernel drops the ``flock`` when its process dies (even by ``kill -9``), so the lock
of a dead process on this host is taken over; a lock file written on another host cannot be
checked from here and is refused, naming the file to delete once that process is gone.

Plain Python: no Lightning, W&B or reporting import.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning_influence._io import remove_incomplete
from lightning_influence.results import runs_in_directory

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: a lock file left behind is deleted by hand
    fcntl = None

__all__ = ["LOCK_FILE", "OutputDirectory"]

LOCK_FILE = ".lightning-influence.lock"


class OutputDirectory:
    """The output directory of the run ``run_id``, claimed by this process (call on the writing
    process only: process 0 under DDP).

    Args:
        path: the run's ``output_dir``.
        run_id: the run writing there; results of other runs found there are refused.
        versioned: ``path`` is a default the user did not choose: when another run has it, take
            the run's own or the next free ``<path>-vN`` instead (:attr:`path` says which).
    """

    def __init__(self, path: Path, run_id: str, *, versioned: bool = False) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.versioned = versioned
        self._lock_fd: Optional[int] = None

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def claimed(self) -> bool:
        return self._lock_fd is not None

    def claim(self) -> None:
        """Lock the directory for this run, refuse it if it holds another run's results, and
        remove what interrupted writes of this project left there. Raises ``ValueError`` naming
        what to do instead (versioned: only when even the run's own directory is taken)."""
        if self.claimed:
            return
        if not self.versioned:
            self._claim(self.path)
            return
        candidates = _versions(self.path)
        own = [path for path in candidates if self.run_id in runs_in_directory(path)]
        refusal: Optional[ValueError] = None
        for path in own[:1] or candidates:
            try:
                self._claim(path)
            except ValueError as err:
                refusal = err
                continue
            if path != candidates[0] and not own:
                warnings.warn(f"lightning-influence: {candidates[0]} holds another run's results (or is being written); "
                              f"this run writes its results to {path}", UserWarning, stacklevel=2)
            return
        raise refusal

    def _claim(self, path: Path) -> None:
        check_writable(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock()
        try:
            self._refuse_other_runs()
        except BaseException:
            self.release()
            raise
        remove_incomplete(path)  # only now: a concurrent writer's temporary files are not leftovers

    def release(self) -> None:
        """Give the directory up (at the end of fit, after an exception, at teardown); idempotent."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            if _same_file(fd, self.lock_path):
                self.lock_path.unlink()
        finally:
            os.close(fd)

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            holder = _read_holder(fd)
            if not _try_flock(fd, holder) or not _same_file(fd, self.lock_path):
                raise ValueError(self._held_message(holder))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "run_id": self.run_id}).encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _held_message(self, holder: Dict[str, Any]) -> str:
        who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            who = "another influence callback or monitor of this process"
        return (f"output_dir={str(self.path)!r} is being written by {who} (lock file {self.lock_path}); two runs "
                "writing one directory would mix their results. Give this run its own output_dir, or wait for that "
                "run to end; if that process is gone (e.g. on another machine), delete the lock file")

    def _refuse_other_runs(self) -> None:
        others = {run: names for run, names in runs_in_directory(self.path).items() if run != self.run_id}
        if not others:
            return
        listed = "; ".join(f"{'run ' + run if run else 'a run of an earlier version'}: {', '.join(names[:6])}"
                           f"{', ...' if len(names) > 6 else ''}" for run, names in others.items())
        raise ValueError(
            f"output_dir={str(self.path)!r} holds the influence results of another training run ({listed}); this run "
            "would overwrite or mix with them. To continue that run, resume it from its checkpoint "
            "(trainer.fit(..., ckpt_path=...)); to start a new run, give it another output_dir (or leave output_dir "
            "unset: the default directory gets a new version, influence-v1, -v2, ..., for each run); to discard the "
            "old results, move or delete those directories first")


def _versions(base: Path) -> List[Path]:
    """``base``, its existing versions ``<base>-vN`` in order, and the next free one."""
    pattern = re.compile(re.escape(base.name) + r"-v(\d+)")
    numbers = sorted(int(m.group(1)) for p in (base.parent.iterdir() if base.parent.is_dir() else ())
                     if (m := pattern.fullmatch(p.name)))
    return [base] + [base.with_name(f"{base.name}-v{n}") for n in numbers] + \
        [base.with_name(f"{base.name}-v{(numbers[-1] if numbers else 0) + 1}")]


def _try_flock(fd: int, holder: Dict[str, Any]) -> bool:
    """Take the exclusive lock without waiting; whether it was free. Without ``flock`` (Windows)
    whether a process is alive cannot be told safely, so a lock file naming anyone is taken."""
    if fcntl is None:
        return not holder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    # Free, but written on another host: its process may be alive there (a flock need not reach it).
    return not holder or holder.get("host") == socket.gethostname()


def _read_holder(fd: int) -> Dict[str, Any]:
    """Who the lock file names (``{}``: nobody, or unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (a lock file released and deleted meanwhile
    by its owner may have been replaced by another writer's)."""
    try:
        found, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def check_writable(directory: Path) -> None:
    """Refuse, before any work, an output directory that could never be written (a path through a
    regular file, a read-only file system): probed in its nearest existing ancestor, creating nothing."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".influence-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write influence results under output_dir={str(directory)!r} ({err}); "
                         "choose a writable output_dir") from err
