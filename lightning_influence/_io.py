"""Atomic, pickle-free persistence shared by results and factors.

Everything is written as ``safetensors`` (tensors) plus ``meta.json`` (everything else) inside a
directory that appears under its final name only once complete: a process killed mid-write leaves
a hidden temporary directory behind, never a half-written result.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
META_FILE = "meta.json"
TENSOR_FILE = "tensors.safetensors"


class FormatError(ValueError):
    """A file or directory is missing, corrupted, or not what the loader expected."""


# Temporary and set-aside names carry this project's name and a random suffix, so the start-up
# clean-up can never mistake a user's ``.env.old-2024`` or ``.cache.tmp-keep/`` for a leftover of ours.
_TEMP_PREFIX = ".lightning-influence-tmp-"
_OLD_PREFIX = ".lightning-influence-old-"
_LEFTOVER = re.compile(r"\.lightning-influence-(?:tmp|old)-.+-[0-9a-f]{12}")
_FORMAT_PREFIX = "lightning-influence/"
# What this project writes inside a result or factors directory (its tensors and metadata, a factors
# shard, the factors subdirectory, the report subdirectory): replacing such a directory deletes these
# and nothing else.
_OUR_ENTRY = re.compile(r"meta\.json|tensors\.safetensors|shard-\d+\.safetensors|factors|report")

# Permissions: directories and files are created with ``os.mkdir`` / ``os.open`` and the default
# modes 0o777 / 0o666, which the kernel narrows by the user's umask (``tempfile.mkdtemp`` / ``mkstemp``
# are avoided: they force 0o700 / 0o600). safetensors creates its files 0o600 itself, so they are
# chmod-ed to ``0o666 & ~umask`` (see ``_umask``).


def _umask() -> int:
    """The process umask. ``os.umask`` can only be read by setting it, which is process-global and
    races with threads creating files, so Linux's ``/proc/self/status`` is read instead (each time:
    cheap, and it follows later changes); elsewhere, the value read once at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _IMPORT_UMASK


def _read_umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _read_umask_by_setting()


def _private_name(prefix: str, final: Path) -> Path:
    return final.parent / f"{prefix}{final.name}-{uuid.uuid4().hex[:12]}"


def our_format(path: PathLike) -> Optional[str]:
    """The format this project wrote ``path`` as (e.g. ``"lightning-influence/result"``), or ``None``
    when ``path`` is not a directory whose ``meta.json`` names one of our formats."""
    try:
        with open(Path(path) / META_FILE, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    found = meta.get("format") if isinstance(meta, dict) else None
    return found if isinstance(found, str) and found.startswith(_FORMAT_PREFIX) else None


def check_replaceable(path: PathLike, overwrite: bool) -> None:
    """Raise ``FileExistsError`` unless writing a directory at ``path`` deletes nothing it should not.

    Free: a missing path or an empty directory. Replaceable with ``overwrite``: a directory this
    project wrote (a result or factors) holding nothing else. Never: a file, a symbolic link, or a
    directory holding anything else (e.g. a note a user saved next to a result).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            return
        found = our_format(path)
        if found is not None:
            others = sorted(p.name for p in path.iterdir() if not _OUR_ENTRY.fullmatch(p.name))
            if others:
                raise FileExistsError(
                    f"{path} holds a saved {found} and files lightning-influence did not write ({', '.join(others[:5])}"
                    f"{', ...' if len(others) > 5 else ''}); refusing to replace it (they would be deleted): move "
                    "them elsewhere")
            if overwrite:
                return
            raise FileExistsError(
                f"{path} already holds a saved {found}; pass overwrite=True (command line: --overwrite) "
                "to replace it, or choose another path")
    raise FileExistsError(
        f"{path} already exists and is not a lightning-influence result; refusing to replace it (its "
        "contents would be deleted): choose a new or empty directory")


@contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block exits without error.

    Args:
        path: the final directory.
        overwrite: whether an existing directory written by this project may be replaced (the
            callback re-computing a step after a resume). Anything else already at ``path`` (a file,
            a non-empty directory we did not write) is refused with ``FileExistsError``, before the
            block runs and again before the rename; an empty directory is simply used.
    """
    final = Path(path)
    check_replaceable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private_name(_TEMP_PREFIX, final)
    os.mkdir(tmp)
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):  # make the contents durable before the rename publishes them
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    os.fsync(fh.fileno())
        check_replaceable(final, overwrite)  # something may have appeared there meanwhile
        if final.is_dir() and any(final.iterdir()):
            # Move the old version aside first so the final name never points at a mix of both.
            trash = _private_name(_OLD_PREFIX, final)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)  # rename(2) replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file and a rename: never a half file."""
    path = Path(path)
    tmp = _private_name(_TEMP_PREFIX, path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_incomplete(directory: PathLike) -> List[Path]:
    """Delete what interrupted :func:`atomic_directory` / :func:`write_file_atomic` calls left in
    ``directory`` (entries named exactly ``.lightning-influence-tmp|old-<name>-<12 hex digits>``,
    which no loader reads); return what was removed. Nothing else is touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if _LEFTOVER.fullmatch(p.name)]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
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

    out: Dict[str, torch.Tensor] = {}
    seen = set()  # safetensors refuses tensors sharing memory: one stored under several names is copied
    for key, value in tensors.items():
        out[key] = value.detach().contiguous().cpu()
        if id(value) in seen:
            out[key] = out[key].clone()
        seen.add(id(value))
    save_file(out, str(path))
    os.chmod(path, 0o666 & ~_umask())


def load_tensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FormatError(f"{path}: missing tensor file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: corrupted or not a safetensors file ({err})") from err


def load_tensor_subset(path: PathLike, names: Sequence[str],
                       device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, read without loading the others."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FormatError(f"{path}: missing tensor file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            return {name: fh.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: corrupted or not a safetensors file ({err})") from err


def read_tensor_shapes(path: PathLike) -> Dict[str, Tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, from its header only (no data read)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FormatError(f"{path}: missing tensor file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: corrupted or not a safetensors file ({err})") from err
