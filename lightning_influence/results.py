"""``InfluenceResult``: the scores of one influence computation, saved and loaded without pickle.

A result is a directory ``<dir>/meta.json`` + ``<dir>/tensors.safetensors``. Loading reads the
metadata at once and the tensors on first access, so a run's list of results stays cheap to hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from lightning_influence._io import (
    META_FILE,
    TENSOR_FILE,
    FormatError,
    PathLike,
    atomic_directory,
    load_tensors,
    read_meta,
    save_tensors,
    write_json,
)

RESULT_FORMAT = "lightning-influence/result"
FORMAT_VERSION = 1

# Tensor fields a result may hold; everything else lives in ``meta``.
_TENSOR_FIELDS = (
    "scores",  # [n_query, n_train]
    "train_ids",  # [n_train] indices into the training dataset
    "query_ids",  # [n_query] indices into the query dataset
    "layer_scores",  # [n_layers, n_query, n_train]
    "token_scores",  # [n_query, n_train, seq_len], indexed by the input position a layer reads
    "token_mask",  # [n_train, seq_len] bool: which token scores are real (not padding)
    "self_scores",  # [n_train] self-influence
    # The callback keeps per-token scores only for each query's top/bottom-k examples:
    "top_ids",  # [n_query, k] train ids, most positive first
    "bottom_ids",  # [n_query, k] train ids, most negative first
    "top_token_scores",  # [n_query, k, seq_len]
    "bottom_token_scores",  # [n_query, k, seq_len]
    "top_token_mask",  # [n_query, k, seq_len] bool
    "bottom_token_mask",  # [n_query, k, seq_len] bool
)


class InfluenceResult:
    """Influence scores of training examples on queries, from one checkpoint (or aggregated).

    ``scores[q, j]`` is the influence of training example ``train_ids[j]`` on query
    ``query_ids[q]``: positive means up-weighting the example increases the query measurement
    (by default the query's log-likelihood), i.e. the example helps the query.

    Args:
        scores: ``[n_query, n_train]`` influence scores.
        train_ids: ``[n_train]`` dataset indices of the scored training examples.
        query_ids: ``[n_query]`` dataset indices of the queries.
        layer_names: names of the tracked layers, in the order of ``layer_scores``.
        step: global step of the checkpoint the scores describe (``None`` offline).
        epoch: epoch of that checkpoint.
        meta: JSON-serialisable metadata (strategy, damping, checkpoint path, timings, ...).
        **tensors: optional tensor fields (``layer_scores``, ``token_scores``, ``token_mask``,
            ``self_scores``, ``top_ids``, ``bottom_ids``, ``top_token_scores``, ...).
    """

    def __init__(
        self,
        scores: Optional[torch.Tensor] = None,
        train_ids: Optional[torch.Tensor] = None,
        query_ids: Optional[torch.Tensor] = None,
        layer_names: Sequence[str] = (),
        step: Optional[int] = None,
        epoch: Optional[int] = None,
        meta: Optional[Mapping[str, Any]] = None,
        path: Optional[PathLike] = None,
        **tensors: Optional[torch.Tensor],
    ) -> None:
        unknown = set(tensors) - set(_TENSOR_FIELDS)
        if unknown:
            raise TypeError(f"unknown result fields {sorted(unknown)}; known: {list(_TENSOR_FIELDS)}")
        self._tensors: Dict[str, torch.Tensor] = {}
        given = dict(tensors, scores=scores, train_ids=train_ids, query_ids=query_ids)
        for name, value in given.items():
            if value is not None:
                self._tensors[name] = value.detach().cpu()
        self.layer_names: List[str] = list(layer_names)
        self.step = step
        self.epoch = epoch
        self.meta: Dict[str, Any] = dict(meta or {})
        self.path: Optional[Path] = Path(path) if path is not None else None
        self._tensor_file: Optional[Path] = None  # set by ``load``: tensors not read yet
        if path is None and scores is not None:
            self._validate()

    # -- tensor fields -------------------------------------------------------------------------
    def _field(self, name: str) -> Optional[torch.Tensor]:
        if self._tensor_file is not None:
            self._tensors.update(load_tensors(self._tensor_file))
            self._tensor_file = None
        return self._tensors.get(name)

    scores = property(lambda self: self._field("scores"), doc="[n_query, n_train] scores")
    train_ids = property(lambda self: self._field("train_ids"), doc="[n_train] dataset indices")
    query_ids = property(lambda self: self._field("query_ids"), doc="[n_query] dataset indices")
    layer_scores = property(lambda self: self._field("layer_scores"), doc="[n_layers, n_query, n_train]")
    token_scores = property(lambda self: self._field("token_scores"), doc="[n_query, n_train, seq_len]")
    token_mask = property(lambda self: self._field("token_mask"), doc="[n_train, seq_len] valid tokens")
    self_scores = property(lambda self: self._field("self_scores"), doc="[n_train] self-influence")

    def get(self, name: str) -> Optional[torch.Tensor]:
        """Any tensor field by name (e.g. ``"top_ids"``), or ``None`` if the result lacks it."""
        if name not in _TENSOR_FIELDS:
            raise KeyError(f"unknown result field {name!r}; known: {list(_TENSOR_FIELDS)}")
        return self._field(name)

    @property
    def num_queries(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.scores.shape[1])

    def _validate(self) -> None:
        scores = self._tensors["scores"]
        if scores.dim() != 2:
            raise ValueError(f"scores must be [n_query, n_train], got shape {tuple(scores.shape)}")
        n_query, n_train = scores.shape
        if "train_ids" not in self._tensors:
            self._tensors["train_ids"] = torch.arange(n_train)
        if "query_ids" not in self._tensors:
            self._tensors["query_ids"] = torch.arange(n_query)
        if self._tensors["train_ids"].shape != (n_train,) or self._tensors["query_ids"].shape != (n_query,):
            raise ValueError("train_ids / query_ids do not match the shape of scores")
        layer_scores = self._tensors.get("layer_scores")
        if layer_scores is not None and tuple(layer_scores.shape) != (len(self.layer_names), n_query, n_train):
            raise ValueError(
                f"layer_scores has shape {tuple(layer_scores.shape)}, expected "
                f"({len(self.layer_names)}, {n_query}, {n_train}) for layer_names {self.layer_names}"
            )

    # -- convenience ---------------------------------------------------------------------------
    def top_k(self, k: int, largest: bool = True) -> "torch.return_types.topk":
        """Per query, the ``k`` highest (or lowest) finite scores; ``.indices`` are *train ids*.

        NaN scores (examples whose gradients were not finite) are never ranked: a query with fewer
        than ``k`` finite scores is padded at the end with id -1 and value ``-inf`` (``+inf`` for the
        lowest), as :func:`finite_topk` does."""
        found = finite_topk(self.scores, k, largest)
        ids = torch.where(found.indices >= 0, self.train_ids[found.indices.clamp_min(0)], -1)
        return torch.return_types.topk((found.values, ids))

    def __repr__(self) -> str:
        if self._tensor_file is not None:
            shape = "not loaded"
        else:
            shape = "x".join(map(str, self.scores.shape)) if self.scores is not None else "empty"
        where = f", path='{self.path}'" if self.path else ""
        return f"InfluenceResult(step={self.step}, epoch={self.epoch}, scores={shape}{where})"

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: PathLike) -> Path:
        """Write atomically to the directory ``path`` (replacing it) and return it."""
        with atomic_directory(path) as tmp:
            self.write_into(tmp)
        self.path = Path(path)
        return self.path

    def write_into(self, directory: PathLike) -> None:
        """Write the result's files into ``directory`` (for callers that make a larger directory
        atomic, e.g. a result together with its factors); :meth:`save` is the atomic form."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: self._field(name) for name in _TENSOR_FIELDS}
        save_tensors(directory / TENSOR_FILE, {k: v for k, v in tensors.items() if v is not None})
        write_json(
            directory / META_FILE,
            {
                "format": RESULT_FORMAT,
                "version": FORMAT_VERSION,
                "step": self.step,
                "epoch": self.epoch,
                "layer_names": self.layer_names,
                "meta": self.meta,
            },
        )

    @classmethod
    def load(cls, path: PathLike) -> "InfluenceResult":
        """Open a saved result; tensors are read on first access. Raises ``FormatError``."""
        meta = read_meta(path, RESULT_FORMAT)
        if meta.get("version", 0) > FORMAT_VERSION:
            raise FormatError(f"{path}: result format version {meta['version']} is newer than supported")
        tensor_file = Path(path) / TENSOR_FILE
        if not tensor_file.is_file():
            raise FormatError(f"{path}: {TENSOR_FILE} is missing")
        result = cls(
            layer_names=meta.get("layer_names", []),
            step=meta.get("step"),
            epoch=meta.get("epoch"),
            meta=meta.get("meta", {}),
            path=path,
        )
        result._tensor_file = tensor_file
        return result


def finite_topk(scores: torch.Tensor, k: int, largest: bool = True) -> "torch.return_types.topk":
    """``torch.topk`` over the last axis that never ranks a NaN or infinite score.

    ``torch.topk`` orders NaN above everything, so one broken example would top every query. Here
    non-finite scores are left out; ``k`` is capped at the axis length, and a row with fewer than
    ``k`` finite scores is padded at its end with index -1 and value ``-inf`` when ``largest``
    (``+inf`` otherwise). Mind the -1 before indexing with ``.indices``.
    """
    k = min(k, scores.shape[-1])
    finite = torch.isfinite(scores)
    fill = -math.inf if largest else math.inf
    found = torch.topk(scores.masked_fill(~finite, fill), k, dim=-1, largest=largest)
    ranked = finite.gather(-1, found.indices)
    return torch.return_types.topk((found.values.masked_fill(~ranked, fill), found.indices.masked_fill(~ranked, -1)))


def load_results(directory: PathLike) -> List[InfluenceResult]:
    """All results in a run directory (``<dir>/step=<N>/``), or the single result at ``directory``.

    Results are ordered by step; hidden temporary directories from interrupted writes are ignored.
    """
    directory = Path(directory)
    if (directory / META_FILE).is_file():
        return [InfluenceResult.load(directory)]
    if not directory.is_dir():
        raise FormatError(f"{directory}: no such result or run directory")
    found = [
        InfluenceResult.load(child)
        for child in directory.iterdir()
        if child.is_dir() and not child.name.startswith(".") and (child / META_FILE).is_file()
    ]
    if not found:
        raise FormatError(f"{directory}: contains no influence results")
    return sorted(found, key=lambda r: (r.step is None, r.step or 0, str(r.path)))


def aggregate(results: Sequence[InfluenceResult], weighting: Union[str, Sequence[float]] = "mean_abs") -> InfluenceResult:
    """Trajectory influence: combine several checkpoints' results into one.

    Args:
        results: results over the same queries and training examples (matched on their ids).
        weighting: ``"mean_abs"`` (default) divides each checkpoint's scores by their mean absolute
            value before averaging, so that every checkpoint counts equally whatever its scale;
            ``"none"`` averages raw scores; a sequence of floats gives explicit per-checkpoint weights
            applied to raw scores (e.g. learning rates, as in TracIn).
    """
    if not results:
        raise ValueError("aggregate() needs at least one result")
    first = results[0]
    for other in results[1:]:
        if not (torch.equal(other.train_ids, first.train_ids) and torch.equal(other.query_ids, first.query_ids)):
            raise ValueError(
                "aggregate() needs results over the same training examples and queries "
                f"(step {first.step} and step {other.step} differ); use li.compare to match ids"
            )
    if isinstance(weighting, str):
        if weighting not in ("mean_abs", "none"):
            raise ValueError(f"weighting must be 'mean_abs', 'none' or a list of floats, got {weighting!r}")
        if weighting == "mean_abs":
            weights = [1.0 / max(r.scores.abs().mean().item(), 1e-30) for r in results]
        else:
            weights = [1.0] * len(results)
    else:
        weights = [float(w) for w in weighting]
        if len(weights) != len(results):
            raise ValueError(f"got {len(weights)} weights for {len(results)} results")

    def combine(field: str) -> Optional[torch.Tensor]:
        tensors = [r.get(field) for r in results]
        if any(t is None for t in tensors):
            return None
        return sum(w * t.double() for w, t in zip(weights, tensors)).div(len(results)).float()

    same_layers = all(r.layer_names == first.layer_names for r in results)
    return InfluenceResult(
        scores=combine("scores"),
        train_ids=first.train_ids,
        query_ids=first.query_ids,
        layer_names=first.layer_names if same_layers else [],
        layer_scores=combine("layer_scores") if same_layers else None,
        step=max((r.step for r in results if r.step is not None), default=None),
        epoch=max((r.epoch for r in results if r.epoch is not None), default=None),
        meta={
            "aggregated_steps": [r.step for r in results],
            "aggregated_paths": [str(r.path) if r.path else None for r in results],
            "weighting": weighting if isinstance(weighting, str) else weights,
        },
    )
