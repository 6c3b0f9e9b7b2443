"""A run's index of the results it wrote: what was computed when, why, and beside which checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from lightning_influence.results import InfluenceResult, is_saved_result, update_result_meta


class ResultIndex:
    """The results a run wrote under ``output_dir``, oldest first, with why each was computed and
    the checkpoints it belongs to. Directories are stored relative to ``output_dir``, so a run that
    was moved or copied resumes with its own earlier results."""

    def __init__(self) -> None:
        self.output_dir: Optional[Path] = None
        self.entries: List[Dict[str, Any]] = []
        self._handles: Dict[str, InfluenceResult] = {}

    def find(self, step: int) -> Optional[Dict[str, Any]]:
        return next((entry for entry in self.entries if entry["step"] == step), None)

    def path(self, entry: Dict[str, Any]) -> Path:
        return Path(self.output_dir) / entry["dir"]

    def is_saved(self, entry: Dict[str, Any]) -> bool:
        """Whether the entry's result is on disk in ``output_dir`` (never through a symbolic link)."""
        path = self.path(entry)
        return self.output_dir is not None and not path.is_symlink() and is_saved_result(path)

    def add(self, step: int, epoch: Optional[int], reason: str) -> Dict[str, Any]:
        entry = {"step": step, "epoch": epoch, "reasons": [reason], "dir": f"step={step}", "checkpoint_paths": []}
        self.entries.append(entry)
        return entry

    def results(self) -> List[InfluenceResult]:
        """The saved results (tensors load lazily); entries whose directory is missing are skipped."""
        found = []
        for entry in self.entries:
            if not self.is_saved(entry):
                continue
            if entry["dir"] not in self._handles:
                self._handles[entry["dir"]] = InfluenceResult.load(self.path(entry))
            found.append(self._handles[entry["dir"]])
        return found

    def write_meta(self, entry: Dict[str, Any]) -> None:
        """Record the entry's reasons and checkpoint paths in its saved result (one process only)."""
        if not self.is_saved(entry):
            return
        path = self.path(entry)
        paths = list(entry["checkpoint_paths"])
        meta = update_result_meta(path, checkpoint_path=paths[0] if paths else None, checkpoint_paths=paths,
                                  reasons=list(entry["reasons"]))
        if entry["dir"] in self._handles:
            self._handles[entry["dir"]].meta.update(meta)

    def record_checkpoints(self, saved_at: Callable[[int], List[str]], resumed_from: Optional[str],
                           step: int) -> List[Dict[str, Any]]:
        """Record the checkpoints saved at each awaiting entry's step (``saved_at(step)``; known only
        after the save), or the checkpoint a run resumed from; return the entries that changed.
        An entry stops waiting once recorded or once training moved past its step."""
        changed = []
        for entry in self.entries:
            if not entry.get("awaiting_checkpoint"):
                continue
            paths = saved_at(entry["step"]) + ([resumed_from] if entry.get("restored") and resumed_from else [])
            new = [p for p in paths if p not in entry["checkpoint_paths"]]
            if new:
                entry["checkpoint_paths"].extend(new)
                changed.append(entry)
            if new or step > entry["step"] or entry.get("restored"):
                entry["awaiting_checkpoint"] = False
                entry.pop("restored", None)
        return changed

    def state(self) -> List[Dict[str, Any]]:
        return [dict(entry) for entry in self.entries]

    def load_state(self, entries: Sequence[Dict[str, Any]]) -> None:
        """Entries of a resumed run; one awaiting its checkpoint path belongs to the checkpoint resumed from."""
        self.entries = [current_entry(entry) for entry in entries]
        for entry in self.entries:
            if entry.get("awaiting_checkpoint"):
                entry["restored"] = True


def current_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """An index entry in today's layout (callback states of version 1 stored absolute paths),
    refused unless its directory is the ``step=<N>`` of its own step directly under ``output_dir``:
    an edited checkpoint must not make a run read or write anywhere else."""
    entry = dict(entry)
    if "dir" not in entry:
        entry["dir"] = Path(entry.pop("path")).name
    if entry["dir"] != f"step={entry.get('step')}":
        raise ValueError(f"the checkpoint's influence state names the result directory {entry['dir']!r} for step "
                         f"{entry.get('step')!r}; results live in output_dir as step=<N>, so the checkpoint was "
                         "edited or damaged: resume from an intact checkpoint")
    return entry
