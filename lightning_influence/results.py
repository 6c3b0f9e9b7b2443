"""``InfluenceResult``: the scores of one influence computation, saved and loaded without pickle.

A result is a directory ``<dir>/meta.json`` + ``<dir>/tensors.safetensors`` (+ ``<dir>/factors/``
when saved with its factors). Loading reads the metadata and the tensor file's header at once and
the tensors on first access, so a run's list of results stays cheap to hold. This module owns that
layout: other modules write and update results through its functions, never by path.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from lightning_influence._io import (
    META_FILE,
    TENSOR_FILE,
    FormatError,
    PathLike,
    atomic_directory,
    json_bytes,
    json_ready,
    load_tensors,
    our_format,
    read_meta,
    read_tensor_shapes,
    save_tensors,
    write_file_atomic,
    write_json,
)
from lightning_influence.analysis.sketch import MOMENTS, NUM_BINS, SKETCH_FIELDS
from lightning_influence.engine.tracking import model_class

if TYPE_CHECKING:
    from lightning_influence.engine.factors import Factors

RESULT_FORMAT = "lightning-influence/result"
FORMAT_VERSION = 1
FACTORS_DIR = "factors"  # the subdirectory of a result holding the factors it was computed with
_REQUIRED_TENSORS = ("train_ids", "query_ids")  # and either "scores" or a sketch's "score_moments"

# Tensor fields a result may hold; everything else lives in ``meta``.
_TENSOR_FIELDS = (
    "scores",  # [n_query, n_train]
    "train_ids",  # [n_train] indices into the training dataset
    "query_ids",  # [n_query] indices into the query dataset
    "layer_scores",  # [n_layers, n_query, n_train]
    "layer_abs_sums",  # [n_layers, n_query] float64: Σ_n |layer score| over finite examples (layer distribution)
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
    # The per-step ledger of the window before this computation (sparse: the examples it saw):
    "ledger_ids",  # [n_seen] training-dataset indices, sorted
    "ledger_scores",  # [n_query, n_seen] learning-rate-weighted per-step scores, summed
    "top_layer_scores",  # [n_layers, n_query, k] per-layer scores of the top_ids examples
    "bottom_layer_scores",  # [n_layers, n_query, k]
    # Instead of ``scores`` for pools too large for [n_query, n_train] (see ``sketch.ScoreSketch``):
    "kept_top_scores",  # [n_query, M] the M most positive finite scores, descending (-inf: none)
    "kept_top_ids",  # [n_query, M] their train ids (-1: none)
    "kept_bottom_scores",  # [n_query, M] the M most negative finite scores, ascending (+inf: none)
    "kept_bottom_ids",  # [n_query, M]
    "score_moments",  # [n_query, 6] float64: count, positive count, Σs, Σ|s|, Σs², Σmax(s, 0)
    "score_histogram_counts",  # [n_query, 2, bins] float64: scores per sign (+, -) and log2|s| bin
    "score_histogram_sums",  # [n_query, 2, bins] float64: Σ|s| per bin
)

# What ``meta`` may hold beside the tensors: every key the package writes, and what it means (the
# reference page docs/reference/result-meta.md lists the same keys). Users may add their own keys.
META_FIELDS = {
    # scoring (every result)
    "strategy": "the curvature approximation",
    "fisher": "the Fisher the covariances were built with",
    "damping": "per layer, the damping used",
    "query_rank": "rank of the low-rank queries (None: exact)",
    "query_truncation": "how low-rank queries were truncated",
    "n_train": "examples scored",
    "n_query": "queries scored",
    "nonfinite_train_ids": "examples whose scores were not finite (never ranked)",
    "nonfinite_query_ids": "queries whose scores were not finite",
    "timings": "seconds of each stage",
    # the checkpoint procedure
    "run": "the run identity (report, compare and aggregate refuse to mix runs)",
    "n_pool": "size of the candidate pool",
    "world_size": "processes that computed the result",
    "keep_top_scores": "scores kept per query and sign (None: every score)",
    "streaming_pool": "whether the pool was a stream",
    "tokens_seen": "per layer, the real tokens its activation covariance was built from",
    "token_scores_skipped": "why the top examples' token scores are missing (None: not skipped)",
    "curvature": "how fresh the curvature is at the scored weights",
    # the training loops
    "reasons": "what triggered the computation",
    "checkpoint_path": "the first checkpoint saved at the result's step",
    "checkpoint_paths": "every checkpoint saved at the result's step",
    "config": "the loop's settings",
    "steps_collected": "optimizer steps whose statistics the covariances hold",
    "steps_collected_total": "optimizer steps collected since training started",
    "steps_skipped": "collected steps dropped (AMP-skipped or non-finite)",
    "window": "the training window: optimizer batches and summed learning rate",
    "ledger": "the share of each layer's query norm the ledger's subspace captured",
    "monitors": "the monitor scalars logged with the result",
    # aggregate()
    "aggregated_steps": "steps of the combined results",
    "aggregated_paths": "directories of the combined results",
    "weighting": "how the checkpoints were weighted",
}


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
        if path is None and (scores is not None or "score_moments" in self._tensors):
            self._validate()

    # -- tensor fields -------------------------------------------------------------------------
    def _field(self, name: str) -> Optional[torch.Tensor]:
        if self._tensor_file is not None:
            self._tensors.update(load_tensors(self._tensor_file))
            self._tensor_file = None
        return self._tensors.get(name)

    scores = property(lambda self: self._field("scores"),
                      doc="[n_query, n_train] scores; None when computed with keep_top_scores (see is_sketch)")
    train_ids = property(lambda self: self._field("train_ids"), doc="[n_train] dataset indices")
    query_ids = property(lambda self: self._field("query_ids"), doc="[n_query] dataset indices")
    layer_scores = property(lambda self: self._field("layer_scores"), doc="[n_layers, n_query, n_train]")
    token_scores = property(lambda self: self._field("token_scores"), doc="[n_query, n_train, seq_len]")
    token_mask = property(lambda self: self._field("token_mask"), doc="[n_train, seq_len] valid tokens")
    self_scores = property(lambda self: self._field("self_scores"), doc="[n_train] self-influence")

    def set(self, name: str, value: torch.Tensor) -> None:
        """Add or replace a tensor field (e.g. the callback's ``ledger_scores``) before saving."""
        if name not in _TENSOR_FIELDS:
            raise KeyError(f"unknown result field {name!r}; known: {list(_TENSOR_FIELDS)}")
        self._field(name)  # load a saved result's tensors first, so they are not lost
        self._tensors[name] = value.detach().cpu()

    def get(self, name: str) -> Optional[torch.Tensor]:
        """Any tensor field by name (e.g. ``"top_ids"``), or ``None`` if the result lacks it."""
        if name not in _TENSOR_FIELDS:
            raise KeyError(f"unknown result field {name!r}; known: {list(_TENSOR_FIELDS)}")
        return self._field(name)

    @property
    def num_queries(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def num_train(self) -> int:
        return int(self.train_ids.shape[0])

    @property
    def is_sketch(self) -> bool:
        """Whether the result keeps per query only its top/bottom scores and a sketch of the rest
        (``keep_top_scores``) instead of dense ``scores``."""
        return self.scores is None and self.get("score_moments") is not None

    def require_scores(self, what: str) -> torch.Tensor:
        """The dense ``scores``, or a ``ValueError`` saying that ``what`` needs them."""
        if self.scores is None:
            kept = self.get("kept_top_scores")
            detail = f" (it keeps the top/bottom {kept.shape[1]} scores per query)" if kept is not None else ""
            raise ValueError(f"{what} needs every score [n_query, n_train], but this result was computed with "
                             f"keep_top_scores{detail}; recompute with keep_top_scores=None on a pool that fits")
        return self.scores

    def _validate(self) -> None:
        scores = self._tensors.get("scores")
        if scores is not None and scores.dim() == 2:
            n_query, n_train = scores.shape
            self._tensors.setdefault("train_ids", torch.arange(n_train))
            self._tensors.setdefault("query_ids", torch.arange(n_query))
        problem = _shape_problem({name: tuple(t.shape) for name, t in self._tensors.items()}, self.layer_names)
        if problem:
            raise ValueError(problem)

    # -- convenience ---------------------------------------------------------------------------
    def top_k(self, k: int, largest: bool = True) -> "torch.return_types.topk":
        """Per query, the ``k`` highest (or lowest) finite scores; ``.indices`` are *train ids*.

        NaN scores (examples whose gradients were not finite) are never ranked: a query with fewer
        than ``k`` finite scores is padded at the end with id -1 and value ``-inf`` (``+inf`` for the
        lowest), as :func:`finite_topk` does."""
        if self.is_sketch:
            side = "top" if largest else "bottom"
            values, ids = self.get(f"kept_{side}_scores"), self.get(f"kept_{side}_ids")
            if k > values.shape[1] and values.shape[1] < self.num_train:
                raise ValueError(f"this result keeps {values.shape[1]} scores per query (keep_top_scores); "
                                 f"ask for at most that many, not k={k}")
            return torch.return_types.topk((values[:, :k], ids[:, :k]))
        found = finite_topk(self.scores, k, largest)
        ids = torch.where(found.indices >= 0, self.train_ids[found.indices.clamp_min(0)], -1)
        return torch.return_types.topk((found.values, ids))

    def __repr__(self) -> str:
        if self._tensor_file is not None:
            shape = "not loaded"
        else:
            shape = "x".join(map(str, self.scores.shape)) if self.scores is not None else (
                f"top/bottom {self.get('kept_top_scores').shape[1]} of {self.num_train}" if self.is_sketch else "empty")
        where = f", path='{self.path}'" if self.path else ""
        return f"InfluenceResult(step={self.step}, epoch={self.epoch}, scores={shape}{where})"

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write atomically to the directory ``path`` and return it.

        ``path`` may be new or an empty directory; a result (or factors) saved there before is
        replaced only with ``overwrite=True``; anything else there is refused with
        ``FileExistsError``, never deleted.
        """
        with atomic_directory(path, overwrite=overwrite) as tmp:
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
        """Open a saved result; tensors are read on first access. Raises ``FormatError``.

        The metadata and the tensor file's header (names and shapes) are checked at once, so a
        result whose parts disagree is refused here rather than failing later mid-analysis.
        """
        meta = read_meta(path, RESULT_FORMAT)
        version = meta.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError(f"{path}: {META_FILE} has version {version!r}; expected an integer")
        if version > FORMAT_VERSION:
            raise FormatError(f"{path}: result format version {version} is newer than supported ({FORMAT_VERSION}); "
                              "upgrade lightning-influence")
        layer_names = meta.get("layer_names", [])
        if not (isinstance(layer_names, list) and all(isinstance(n, str) for n in layer_names)):
            raise FormatError(f"{path}: {META_FILE} 'layer_names' must be a list of strings")
        for key in ("step", "epoch"):
            if meta.get(key) is not None and (not isinstance(meta[key], int) or isinstance(meta[key], bool)):
                raise FormatError(f"{path}: {META_FILE} {key!r} is {meta[key]!r}; expected an integer or null")
        if not isinstance(meta.get("meta", {}), dict):
            raise FormatError(f"{path}: {META_FILE} 'meta' must be a mapping")
        tensor_file = Path(path) / TENSOR_FILE
        if not tensor_file.is_file():
            raise FormatError(f"{path}: {TENSOR_FILE} is missing")
        shapes = read_tensor_shapes(tensor_file)
        missing = [name for name in _REQUIRED_TENSORS if name not in shapes]
        if "scores" not in shapes and "score_moments" not in shapes:
            missing.append("scores")
        problem = f"lacks the tensors {missing}" if missing else _shape_problem(shapes, layer_names)
        if problem:
            raise FormatError(f"{path}: {TENSOR_FILE} does not match {META_FILE}: {problem}")
        result = cls(layer_names=layer_names, step=meta.get("step"), epoch=meta.get("epoch"),
                     meta=meta.get("meta", {}), path=path)
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


def _shape_problem(shapes: Mapping[str, Tuple[int, ...]], layer_names: Sequence[str]) -> Optional[str]:
    """What is inconsistent between a result's tensor shapes and its layer names (``None``: nothing);
    shared by construction (tensors at hand) and loading (shapes from the file header)."""
    if "scores" in shapes:
        scores = shapes["scores"]
        if len(scores) != 2:
            return f"scores must be [n_query, n_train], got shape {scores}"
        n_query, n_train = scores
        if shapes["train_ids"] != (n_train,) or shapes["query_ids"] != (n_query,):
            return (f"train_ids {shapes['train_ids']} / query_ids {shapes['query_ids']} do not match "
                    f"the shape of scores {scores}")
    else:
        problem = _sketch_shape_problem(shapes)
        if problem:
            return problem
        n_query, n_train = shapes["query_ids"][0], shapes["train_ids"][0]
    layer_scores = shapes.get("layer_scores")
    if layer_scores is not None and layer_scores != (len(layer_names), n_query, n_train):
        return (f"layer_scores has shape {layer_scores}, expected ({len(layer_names)}, {n_query}, {n_train}) "
                f"for the {len(layer_names)} layer_names {list(layer_names)}")
    ledger_ids, ledger_scores = shapes.get("ledger_ids"), shapes.get("ledger_scores")
    if (ledger_ids is None) != (ledger_scores is None) or (
            ledger_ids is not None and (len(ledger_ids) != 1 or ledger_scores != (n_query, ledger_ids[0]))):
        return (f"ledger_ids {ledger_ids} / ledger_scores {ledger_scores} must be [n_seen] / [{n_query}, n_seen], "
                "and come together")
    layer_sums = shapes.get("layer_abs_sums")
    if layer_sums is not None and layer_sums != (len(layer_names), n_query):
        return (f"layer_abs_sums has shape {layer_sums}, expected ({len(layer_names)}, {n_query}) "
                f"for the {len(layer_names)} layer_names {list(layer_names)}")
    return None


def _sketch_shape_problem(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[str]:
    """What is inconsistent in a result that keeps a score sketch instead of dense scores."""
    missing = [name for name in SKETCH_FIELDS if name not in shapes]
    if missing or "train_ids" not in shapes or "query_ids" not in shapes:
        return f"a result without scores needs train_ids, query_ids and the sketch fields; {missing} missing"
    n_query, n_train = shapes["query_ids"][0], shapes["train_ids"][0]
    kept = shapes["kept_top_scores"]
    expected = {"kept_top_ids": kept, "kept_bottom_scores": kept, "kept_bottom_ids": kept,
                "score_moments": (n_query, len(MOMENTS)), "score_histogram_counts": (n_query, 2, NUM_BINS),
                "score_histogram_sums": (n_query, 2, NUM_BINS)}
    wrong = {name: shapes[name] for name, shape in expected.items() if shapes[name] != shape}
    if len(kept) != 2 or kept[0] != n_query or kept[1] > n_train or wrong:
        return (f"the score sketch's shapes do not fit {n_query} queries and {n_train} training examples "
                f"(kept_top_scores {kept}, mismatched {wrong})")
    if "token_scores" in shapes:
        return "a result without dense scores holds no dense token scores"
    return None


def save_result_with_factors(path: PathLike, result: InfluenceResult, factors: "Factors",
                             overwrite: bool = False) -> Path:
    """Write ``result`` with the factors it was computed with (in ``<path>/factors``) as one atomic
    directory: both appear together or not at all, so new queries can be scored later."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        result.write_into(tmp)
        factors.write_into(tmp / FACTORS_DIR)
    result.path = Path(path)
    return result.path


def factors_path(result_or_dir: Union[InfluenceResult, PathLike]) -> Path:
    """The factors directory of a saved factors directory, or of a result saved with its factors."""
    from lightning_influence.engine.factors import FACTORS_FORMAT

    path = result_or_dir.path if isinstance(result_or_dir, InfluenceResult) else result_or_dir
    if path is None:
        raise FormatError("this result was never saved, so it has no factors on disk")
    path = Path(path)
    for candidate in (path, path / FACTORS_DIR):
        if our_format(candidate) == FACTORS_FORMAT:
            return candidate
    raise FormatError(f"{path}: neither saved factors nor a result holding them in {FACTORS_DIR}/ "
                      "(the callback saves factors with every result; offline, use Factors.save)")


def is_saved_result(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding a saved result (written completely: the atomic
    write makes it appear whole or not at all)."""
    return our_format(path) == RESULT_FORMAT


def update_result_meta(path: PathLike, **fields: Any) -> Dict[str, Any]:
    """Set ``fields`` in a saved result's ``meta`` mapping, rewriting only ``meta.json`` (atomically);
    the tensors stay as they are. Returns the new ``meta``."""
    payload = read_meta(path, RESULT_FORMAT)
    if not isinstance(payload.get("meta"), dict):
        raise FormatError(f"{path}: {META_FILE} 'meta' must be a mapping")
    payload["meta"].update(fields)
    write_file_atomic(Path(path) / META_FILE, json_bytes(payload))
    return payload["meta"]


def new_run_id() -> str:
    """A training run's identity: made once, when the run starts, and kept in its checkpoints
    (random, not a hash of the settings: two runs with the same settings are still two runs)."""
    return uuid.uuid4().hex


def run_identity(model: torch.nn.Module, task: Any, pool_ids: Any, run_id: str,
                 config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A result's ``meta["run"]``: the run's ``id`` (:func:`new_run_id`), which decides what is
    one run (:func:`check_same_run`), and a description of it (pool, model, task, settings) for
    the messages that name runs."""
    ids = torch.as_tensor(pool_ids).detach().to("cpu", torch.int64).contiguous()
    return {
        "id": run_id,
        "pool_size": int(ids.numel()),
        "pool_fingerprint": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "model": model_class(model).__qualname__,  # the same under FSDP wrappers as without
        "task": type(task).__name__,
        "config": _digest(json_ready(config)) if config is not None else None,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def saved_run_id(path: PathLike) -> Optional[str]:
    """The run id recorded in a saved result's ``meta["run"]`` (``None``: none recorded, or not a result)."""
    try:
        run = read_meta(path, RESULT_FORMAT).get("meta", {}).get("run")
    except (FormatError, OSError, AttributeError):
        return None
    return run.get("id") if isinstance(run, Mapping) else None


def runs_in_directory(directory: PathLike) -> Dict[Optional[str], List[str]]:
    """The results saved directly under ``directory``, by run id (``None``: a result that records
    none): ``{run id: [directory names]}``. Symbolic links are not followed: a run never writes
    through them."""
    directory = Path(directory)
    found: Dict[Optional[str], List[str]] = {}
    if not directory.is_dir():
        return found
    for child in sorted(directory.iterdir()):
        if not child.is_symlink() and is_saved_result(child):
            found.setdefault(saved_run_id(child), []).append(child.name)
    return found


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


def check_same_run(results: Sequence[InfluenceResult], allow_different_runs: bool = False) -> None:
    """Refuse results written by different training runs (``meta["run"]["id"]``), which
    comparisons and trajectories would silently mix (e.g. a quick and a full run written into
    one directory). Results without ``meta["run"]`` predate run identities and pass.

    Raises:
        ValueError: naming each run found (pool size, model, steps) and how to proceed, unless
            ``allow_different_runs``.
    """
    if allow_different_runs:
        return
    runs: Dict[Any, List[InfluenceResult]] = {}
    for result in results:
        if result_run_id(result) is not None:
            runs.setdefault(result_run_id(result), []).append(result)
    if len(runs) < 2:
        return
    described = "; ".join(_describe_run(run_id, members) for run_id, members in runs.items())
    raise ValueError(
        f"these influence results come from {len(runs)} different training runs: {described}. "
        "Their scores are not comparable: report or compare the results of one run (give each run its "
        "own output directory), or pass allow_different_runs=True (command line: --allow-different-runs) "
        "to proceed anyway."
    )


def result_run_id(result: InfluenceResult) -> Optional[str]:
    """The id of the run that wrote ``result`` (``None``: it predates run identities)."""
    run = result.meta.get("run")
    return run.get("id") if isinstance(run, Mapping) else None


def _describe_run(run_id: Any, members: Sequence[InfluenceResult], max_steps: int = 6) -> str:
    run = members[0].meta["run"]
    steps = [str(result.step) for result in members]
    shown = ", ".join(steps[:max_steps]) + (f", ... ({len(steps)} results)" if len(steps) > max_steps else "")
    return (
        f"run {run_id!r} (pool of {run.get('pool_size', '?')} training examples, "
        f"model {run.get('model', '?')}, step{'s' if len(steps) > 1 else ''} {shown})"
    )
