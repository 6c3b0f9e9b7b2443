"""Atomic, pickle-free persistence shared by results and factors.

Everything is written as ``safetensors`` (tensors) plus ``meta.json`` (everything else) inside a
directory that appears under its final name only once complete: a process killed mid-write leaves
a hidden temporary directory behind, never a half-written result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
META_FILE = "meta.json"
TENSOR_FILE = "tensors.safetensors"


class FormatError(ValueError):
    """A file or directory is missing, corrupted, or not what the loader expected."""


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block exits without error."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):  # make the contents durable before the rename publishes them
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            # Move the old version aside first so the final name never points at a mix of both.
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename: never a half file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_incomplete(directory: PathLike) -> List[Path]:
    """Delete what interrupted :func:`atomic_directory` writes left in ``directory`` (hidden
    ``.<name>.tmp-*`` / ``.<name>.old-*`` entries, which no loader reads); return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def json_ready(value: Any) -> Any:
    """Nested data as strict JSON: tensors and numpy values as lists or numbers, non-finite floats
    as ``None``, mapping keys as strings, any other object as its string."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and numpy scalars
        return json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    """The JSON text every metadata file is written as."""
    return json.dumps(payload, indent=2, sort_keys=True, default=_json_default).encode("utf-8")


def write_json(path: PathLike, payload: Mapping[str, Any]) -> None:
    Path(path).write_bytes(json_bytes(payload))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def read_meta(directory: PathLike, expected_format: str) -> Dict[str, Any]:
    """Read ``meta.json`` and check that it describes an object of ``expected_format``."""
    meta_path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise FormatError(f"{directory}: no such directory (expected a saved {expected_format})")
    if not meta_path.is_file():
        raise FormatError(f"{directory}: no {META_FILE}; not a saved {expected_format} or incomplete")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{meta_path}: corrupted JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{directory}: holds {found!r}, expected a {expected_format!r}")
    return meta


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FormatError(f"{path}: missing tensor file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: corrupted or not a safetensors file ({err})") from err
