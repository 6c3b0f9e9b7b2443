"""The flat settings of earlier releases, kept for one release as deprecated aliases of the grouped ones.

:func:`regroup` turns a mapping that may hold old flat keys (``strategy="kfac"``, ``window="ema"``,
``ledger=True``, ``report=False`` ...) into the grouped spelling (``curvature={"strategy": "kfac"}``),
with one ``FutureWarning`` per old key naming its new spelling. Plain dicts only: the dataclasses
live in :mod:`lightning_influence.config`, which calls this.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Tuple

# old flat name -> (group, field in that group)
MOVED: Dict[str, Tuple[str, str]] = {
    **{name: ("curvature", name) for name in (
        "strategy", "fisher", "damping", "layers", "exclude", "collect_every_n_steps", "max_tokens_per_step",
        "loss_reduction", "correction_batches", "covariance_dtype", "statistics_device", "eigenbasis_dtype",
        "max_layer_mb", "memory_budget_mb", "shard_factors", "shard_statistics")},
    "curvature_refresh": ("curvature", "refresh"),
    **{name: ("scoring", name) for name in (
        "max_train_examples", "query_rank", "top_k", "keep_top_scores", "pool_id_key", "batch_size",
        "self_influence")},
    **{name: ("report", name) for name in ("log_artifacts", "renderer", "show_progress")},
}
# pairs now said by one value
MERGED = {"window": ("curvature", "ema_decay"), "ema_decay": ("curvature", "ema_decay"),
          "ledger": ("scoring", "ledger"), "ledger_subspace": ("scoring", "ledger"),
          "report_in_background": ("report", "mode")}
OLD_NAMES = frozenset(MOVED) | frozenset(MERGED) | {"report"}
GROUPS = ("curvature", "scoring", "report")


def regroup(values: Mapping[str, Any], owner: str = "InfluenceCallback", stacklevel: int = 3) -> Dict[str, Any]:
    """``values`` with the deprecated flat keys moved into their groups (a ``FutureWarning`` each).

    A group given both ways takes the old keys over its own fields (``curvature={...}`` and ``strategy=``).
    ``report`` is old only when it is a boolean (``report=False``); a mapping or a config is the group.
    """
    values = dict(values)
    old = [key for key in values if key in OLD_NAMES and not (key == "report" and not isinstance(values[key], bool))]
    if not old:
        return values
    groups: Dict[str, Dict[str, Any]] = {}
    said = []
    for key in old:
        if key in MOVED:
            group, name = MOVED[key]
            value = groups.setdefault(group, {})[name] = values.pop(key)
            said.append((key, f"{group}={{'{name}': {value!r}}}"))
    # window / ema_decay -> curvature.ema_decay (None: the reset window)
    if "window" in old or "ema_decay" in old:
        window = _popped(values, old, "window", "reset")
        decay = _popped(values, old, "ema_decay", 0.99)
        new = decay if window == "ema" else (None if window == "reset" else window)
        if window not in ("reset", "ema"):
            raise ValueError(f"window must be one of 'reset', 'ema', got {window!r} (deprecated: use "
                             "curvature.ema_decay, None for the reset window)")
        groups.setdefault("curvature", {})["ema_decay"] = new
        said.append(("window/ema_decay", f"curvature={{'ema_decay': {new!r}}} (None: the reset window)"))
    # ledger / ledger_subspace -> scoring.ledger (None: off; 0: exact)
    if "ledger" in old or "ledger_subspace" in old:
        on = _popped(values, old, "ledger", False)
        subspace = _popped(values, old, "ledger_subspace", 32)
        if not isinstance(on, bool):
            raise ValueError(f"ledger must be True or False, got {on!r} (deprecated: use scoring.ledger)")
        new = (0 if subspace is None else subspace) if on else None
        groups.setdefault("scoring", {})["ledger"] = new
        said.append(("ledger/ledger_subspace", f"scoring={{'ledger': {new!r}}} (None: off; 0: exact; "
                                               "k: k shared directions)"))
    # report / report_in_background -> report.mode
    if "report" in old or "report_in_background" in old:
        on = _popped(values, old, "report", True)
        background = _popped(values, old, "report_in_background", True)
        for name, flag in (("report", on), ("report_in_background", background)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r} (deprecated: use report.mode)")
        new = "off" if not on else ("background" if background else "foreground")
        groups.setdefault("report", {})["mode"] = new
        said.append(("report/report_in_background", f"report={{'mode': {new!r}}}"))
    for group, fields in groups.items():
        values[group] = merged_group(values.get(group), fields)
    for key, new in said:
        warnings.warn(f"{owner}: the flat setting {key} is deprecated and will be removed in the next release; "
                      f"write {new}", FutureWarning, stacklevel=stacklevel)
    return values


def _popped(values: Dict[str, Any], old: list, key: str, default: Any) -> Any:
    return values.pop(key, default) if key in old else default


def merged_group(group: Any, fields: Any) -> Any:
    """The group (None, a mapping or a dataclass) with ``fields`` (old flat keys' values) set on top."""
    if not fields:
        return group
    if group is None:
        return fields
    if isinstance(group, Mapping):
        return {**dict(group), **fields}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(group, DictConfig):
            return {**OmegaConf.to_container(group, resolve=True), **fields}
    except ImportError:  # pragma: no cover
        pass
    import dataclasses

    return dataclasses.replace(group, **fields)
