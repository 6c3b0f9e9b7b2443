"""The small checks the settings' validators share (:mod:`lightning_influence.config`): each names the
field it was given in its message."""

from __future__ import annotations

import os
import reprlib
from collections.abc import Sequence
import dataclasses
from typing import Any, Dict, Optional, Tuple

from torch.utils.data import DataLoader

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    """A list, tuple or OmegaConf ListConfig; a string is a name, not a sequence of names."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_name_list(value: Any) -> bool:
    return _is_sequence(value) and all(isinstance(name, str) for name in value)


def _is_text_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str)


def _looks_like_task(value: Any) -> bool:
    """Duck-typed: a Task need not subclass lightning_influence.Task."""
    return all(callable(getattr(value, name, None)) for name in ("loss", "measurement", "forward"))


def _is_dataset_or_loader(value: Any) -> bool:
    """Duck-typed: a map-style dataset indexes, an iterable one (or a DataLoader) iterates."""
    if isinstance(value, DataLoader):
        return True
    return not isinstance(value, (str, bytes)) and (hasattr(value, "__getitem__") or hasattr(value, "__iter__"))


def _bound(value: Optional[int]) -> Optional[int]:
    """A trainer bound, ``None`` when unbounded (Lightning spells that -1)."""
    return None if value is None or value < 0 else value


def _shown(value: Any) -> str:
    """A value for an error message: its repr, shortened (a dataset's repr can be huge), and its type."""
    text = reprlib.repr(value)
    plain = value is None or isinstance(value, (str, bool)) or _is_number(value)
    return text if plain else f"{text} ({type(value).__name__})"


def _check_choice(name: str, value: Any, choices: Tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r} {hint}".rstrip())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_bools(group: str, owner: Any, names: Tuple[str, ...], hint: str = "") -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, bool):
            quoted = " (a string is not read as a boolean: write true / false without quotes in YAML)" \
                if isinstance(value, str) else ""
            where = f"{group}.{name}" if group else name
            raise ValueError(f"{where} must be True or False{hint}, got {_shown(value)}{quoted}")


def _json_fields(owner: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in dataclasses.fields(owner):
        value = getattr(owner, item.name)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[item.name] = value
        elif isinstance(value, (list, tuple)):
            out[item.name] = list(value)
        elif dataclasses.is_dataclass(value):
            out[item.name] = _json_fields(value)
        else:
            out[item.name] = type(value).__name__
    return out
