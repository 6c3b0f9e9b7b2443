"""``InfluenceConfig``: the callback's settings as a dataclass (OmegaConf / Hydra structured config).

The dataclass mirrors the keyword arguments of ``InfluenceCallback`` one to one (a test keeps them
in sync), so the same settings can come from Python, a LightningCLI YAML or a Hydra config. All
validation lives here: :meth:`InfluenceConfig.validate` is what ``InfluenceCallback.__init__``
runs, and every message names the field to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lightning_influence.factors import FISHER_KINDS, STRATEGIES

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
WINDOWS = ("reset", "ema")
COVARIANCE_DTYPES = ("float32", "float64")
QUERY_SPLITS = ("val", "test")
ON_ERROR = ("warn", "raise")
# Built-in tasks a config may name by a string (a YAML file cannot hold a Task instance).
TASK_NAMES = ("classification", "regression", "causal_lm")


@dataclass
class InfluenceConfig:
    """Settings of :class:`~lightning_influence.InfluenceCallback` (see its docstring for each field).

    ``task`` may be a :class:`~lightning_influence.Task` or the name of a built-in task
    (``"classification"``, ``"regression"``, ``"causal_lm"``); ``query_data`` and ``train_data``
    may be datasets only when built in Python (a YAML file uses ``"val"`` / ``"test"`` and the
    trainer's training data). Dtypes are strings.
    """

    task: Any
    query_data: Any = "val"
    num_queries: int = 64
    train_data: Any = None
    every_n_epochs: Optional[int] = 1
    every_n_train_steps: Optional[int] = None
    on_checkpoint: bool = True
    on_train_end: bool = True
    output_dir: Optional[str] = None
    strategy: str = "ekfac"
    fisher: str = "empirical"
    damping: Optional[float] = None
    layers: Optional[List[str]] = None
    exclude: Tuple[str, ...] = ()
    collect_every_n_steps: int = 8
    max_tokens_per_step: Optional[int] = 512
    loss_reduction: str = "mean"
    window: str = "reset"
    ema_decay: float = 0.99
    correction_batches: Optional[int] = 16
    max_train_examples: Optional[int] = None
    seed: int = 0
    query_rank: Optional[int] = None
    top_k: int = 10
    batch_size: int = 32
    renderer: Any = None
    max_layer_mb: Optional[float] = None
    memory_budget_mb: Optional[float] = None
    covariance_dtype: str = "float32"
    report: bool = True
    log_artifacts: bool = True
    show_progress: bool = True
    on_error: str = "warn"

    def validate(self) -> "InfluenceConfig":
        """Raise ``ValueError`` naming the first invalid field; return ``self``."""
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("fisher", self.fisher, tuple(k for k in FISHER_KINDS if k != "exact"),
                      hint="('exact' needs one backward per output dimension; use it offline with fit_factors)")
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("window", self.window, WINDOWS)
        _check_choice("covariance_dtype", self.covariance_dtype, COVARIANCE_DTYPES)
        _check_choice("on_error", self.on_error, ON_ERROR)
        if isinstance(self.task, str):
            _check_choice("task", self.task, TASK_NAMES)
        elif not all(callable(getattr(self.task, name, None)) for name in ("loss", "measurement", "forward")):
            raise ValueError(f"task must be a lightning_influence.Task or one of {TASK_NAMES}, "
                             f"got {type(self.task).__name__}")
        if isinstance(self.query_data, str):
            _check_choice("query_data", self.query_data, QUERY_SPLITS,
                          hint="(or pass a Dataset / DataLoader of queries)")
        elif self.query_data is None:
            raise ValueError("query_data must be 'val', 'test', a Dataset or a DataLoader, got None")
        for name in ("num_queries", "collect_every_n_steps", "top_k", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("every_n_epochs", "every_n_train_steps", "max_tokens_per_step", "correction_batches",
                     "max_train_examples", "query_rank"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.damping is not None and not (_is_number(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a non-negative number or None (per-layer heuristic), got {self.damping!r}")
        if not (_is_number(self.ema_decay) and 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        for name in ("max_layer_mb", "memory_budget_mb"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of MiB or None, got {value!r}")
        if self.layers is not None and (isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers)):
            raise ValueError(f"layers must be a list of module names or glob patterns, got {self.layers!r}")
        if isinstance(self.exclude, str) or not all(isinstance(n, str) for n in self.exclude):
            raise ValueError(f"exclude must be a list of module names or glob patterns, got {self.exclude!r}")
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: give module names or patterns, or None for every trackable layer")
        if not (self.every_n_epochs or self.every_n_train_steps or self.on_checkpoint or self.on_train_end):
            raise ValueError(
                "no trigger is enabled, so influence would never be computed: set every_n_epochs, "
                "every_n_train_steps, on_checkpoint=True or on_train_end=True"
            )
        if self.window == "reset" and self.every_n_train_steps and self.every_n_train_steps < self.collect_every_n_steps:
            raise ValueError(
                f"every_n_train_steps={self.every_n_train_steps} is smaller than collect_every_n_steps="
                f"{self.collect_every_n_steps}: some windows would hold no statistics; collect more often"
            )
        if self.renderer is not None and not callable(getattr(self.renderer, "render", self.renderer)):
            raise ValueError("renderer must be callable or have a render() method")
        return self

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings (objects such as datasets and tasks by their class name)."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None or isinstance(value, (bool, int, float, str)):
                out[item.name] = value
            elif isinstance(value, (list, tuple)):
                out[item.name] = list(value)
            else:
                out[item.name] = type(value).__name__
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "InfluenceConfig":
        """From a dict or an OmegaConf ``DictConfig`` (unknown keys raise, naming them)."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(values, DictConfig):
                values = OmegaConf.to_container(values, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown InfluenceConfig fields {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "exclude" in values and values["exclude"] is not None:
            values["exclude"] = tuple(values["exclude"])
        if values.get("layers") is not None:
            values["layers"] = list(values["layers"])
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, choices: Tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r} {hint}".rstrip())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
