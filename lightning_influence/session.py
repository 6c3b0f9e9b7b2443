"""Influence at one checkpoint, for any training loop: the procedure the callback, the CLI's
``score`` and users' own loops share.

An :class:`InfluenceSession` holds what stays fixed over a run — the task, the candidate pool
(optionally a fixed random subset of it), the queries and the scoring settings — and at each
checkpoint:

1. fits the EK-FAC eigenvalue correction at the current weights on a bounded, seeded part of the
   pool (:meth:`InfluenceSession.fit_factors`), from covariances accumulated during training;
2. scores the pool against the queries (:meth:`InfluenceSession.score`), each process its share,
   gathered onto every rank;
3. keeps per-token scores for each query's most positive / negative examples only;
4. writes the result and its factors as one atomic directory (:meth:`InfluenceSession.write`).

Why a bounded correction pass rather than a lagged basis: the eigenbasis of the accumulated
covariances only exists at the checkpoint; rotating every training step's per-example gradients
into the previous checkpoint's basis would cost ``N·T·d²`` per step and describe the curvature in
a stale basis. ``correction_batches`` fixed batches at the checkpoint cost a few forward/backward
passes. Measured (``benchmarks/accuracy.py``, digits MLP): Pearson with the exact influence 0.714
for the bounded pass against 0.713 for a lagged basis.

Plain PyTorch: no Lightning, W&B or reporting import. Collectives (``distributed``) are no-ops in
a single process and must run on every rank otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torch.utils.data.dataloader import default_collate

from lightning_influence import distributed, passes
from lightning_influence._io import remove_incomplete
from lightning_influence.factors import CovarianceStatistics, Factors, fit_factors
from lightning_influence.results import (
    InfluenceResult,
    finite_topk,
    is_saved_result,
    run_identity,
    save_result_with_factors,
    update_result_meta,
)
from lightning_influence.scoring import PreconditionedQueries, compute_influence, precondition_queries
from lightning_influence.tasks import Task
from lightning_influence.tracking import LayerTracker, TrackedLayer, TrackingError, layers_by_name

log = logging.getLogger(__name__)

# Seeds of the session's private generators, offset from the user's seed so that no two coincide.
_CORRECTION_SUBSET_OFFSET = 1
_CORRECTION_TARGETS_OFFSET = 7919


class InfluenceSession:
    """What stays fixed over a run, and the influence computation at each of its checkpoints.

    Args:
        task: per-example loss and query measurement.
        train_data: the candidate pool: a map-style Dataset, or a DataLoader (its dataset and
            ``collate_fn`` are used; its order and batch size are not). Example ids are indices
            into the dataset.
        query_data: the queries: a Dataset or DataLoader.
        query_ids: dataset indices recorded for the queries (default ``0..Q-1``; e.g. the
            positions of a ``Subset`` of a validation set).
        pool_ids: which pool examples to score (default: all, or ``max_train_examples`` of them).
        max_train_examples: score a fixed random subset of this many examples (seeded).
        strategy, fisher, damping, query_rank: as in :func:`~lightning_influence.compute_influence`.
        top_k: per query, the most positive / negative examples kept with per-token scores.
        self_influence: :meth:`compute` also scores each pool example on itself (``self_scores``).
        batch_size: batch size of the session's own passes.
        correction_batches: batches of the pool in the eigenvalue-correction pass (``None``: all).
        seed: seed of every private random generator.
        show_progress: progress bars (pass ``False`` on all but one process).
        run_config: the settings recorded in each result's run identity (``meta["run"]``, which
            keeps results of different runs apart); default: this session's scoring settings.
    """

    def __init__(self, task: Task, train_data: Any, query_data: Any, *, query_ids: Optional[Sequence[int]] = None,
                 pool_ids: Optional[Tensor] = None, max_train_examples: Optional[int] = None,
                 strategy: str = "ekfac", fisher: str = "empirical", damping: Optional[float] = None,
                 query_rank: Optional[int] = None, top_k: int = 10, self_influence: bool = False, batch_size: int = 32,
                 correction_batches: Optional[int] = 16, seed: int = 0, show_progress: bool = False,
                 run_config: Optional[Dict[str, Any]] = None) -> None:
        self.task = task
        self.pool, self.pool_collate = dataset_and_collate(train_data, "train_data")
        self.queries, self.query_collate = dataset_and_collate(query_data, "query_data")
        self.query_collate = self.query_collate or self.pool_collate
        if isinstance(self.pool, IterableDataset) or not hasattr(self.pool, "__len__"):
            raise ValueError(f"train_data ({type(self.pool).__name__}) has no __len__: influence scores examples by "
                             "index, so the candidate pool must be a map-style Dataset; pass train_data=<map-style "
                             "Dataset>")
        if len(self.pool) == 0:
            raise ValueError("the candidate pool (train_data) is empty")
        if not hasattr(self.queries, "__len__") or len(self.queries) == 0:
            raise ValueError("the query set is empty; pass query_data with at least one example")
        if max_train_examples is not None and max_train_examples > len(self.pool):
            raise ValueError(f"max_train_examples={max_train_examples} is larger than the candidate pool "
                             f"({len(self.pool)} examples); lower it or set it to None")
        self.strategy, self.fisher, self.damping, self.query_rank = strategy, fisher, damping, query_rank
        self.top_k, self.batch_size, self.correction_batches = top_k, batch_size, correction_batches
        self.self_influence = self_influence
        self.seed, self.show_progress = seed, show_progress
        self.run_config = run_config if run_config is not None else {
            "strategy": strategy, "fisher": fisher, "damping": damping, "query_rank": query_rank,
            "correction_batches": correction_batches, "max_train_examples": max_train_examples, "seed": seed}
        self.query_ids = torch.as_tensor(list(query_ids) if query_ids is not None else range(len(self.queries)))
        self.pool_ids = choose_pool_ids(len(self.pool), max_train_examples, seed) if pool_ids is None else pool_ids
        # Set by a second user of each computation's preconditioned queries (the ledger): score() then
        # keeps them for take_prepared_queries() rather than that user preparing them again.
        self.keep_prepared_queries = False
        self._kept_queries: Optional[Tuple[Factors, PreconditionedQueries]] = None

    @property
    def pool_ids(self) -> Tensor:
        """Dataset indices of the scored pool examples, sorted (kept across checkpoints and resumes)."""
        return self._pool_ids

    @pool_ids.setter
    def pool_ids(self, ids: Tensor) -> None:
        ids = torch.as_tensor(ids).long()
        if len(ids) and (int(ids.max()) >= len(self.pool) or int(ids.min()) < 0):
            raise ValueError(f"the candidate pool subset does not fit this training dataset ({len(self.pool)} "
                             "examples); resume with the same data")
        self._pool_ids = ids

    # -- data ----------------------------------------------------------------------------------------
    def loader(self, dataset: Any, collate: Optional[Callable] = None) -> DataLoader:
        """Unshuffled, with a private generator (iterating a DataLoader draws its base seed from
        the global generator otherwise, which would shift the training's own randomness)."""
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          collate_fn=collate or self.pool_collate or default_collate,
                          generator=torch.Generator().manual_seed(self.seed))

    def query_loader(self) -> DataLoader:
        return self.loader(self.queries, self.query_collate)

    def pool_loader(self, ids: Union[Tensor, Sequence[int]]) -> DataLoader:
        return self.loader(Subset(self.pool, torch.as_tensor(ids).tolist()))

    def correction_ids(self) -> Tensor:
        """Fixed, seeded pool indices for the eigenvalue-correction pass."""
        size = len(self.pool)
        count = size if self.correction_batches is None else min(size, self.correction_batches * self.batch_size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + _CORRECTION_SUBSET_OFFSET))
        return order[:count]

    def memory_estimate(self, layers: Sequence[TrackedLayer]) -> str:
        """What the statistics and scores of this session will hold, for a log line."""
        stats_bytes = 2 * sum(layer.factor_bytes for layer in layers)  # statistics + one step's buffer
        n_train, n_query = len(self.pool_ids), len(self.queries)
        score_bytes = 4 * n_query * n_train + 8 * n_query * len(layers)  # scores + per-layer sums
        return (f"tracking {len(layers)} layers; statistics {stats_bytes / 2**20:.3g} MiB, scores "
                f"{score_bytes / 2**20:.3g} MiB ({n_query} queries x {n_train} training examples, and per-layer sums)")

    # -- set-up check --------------------------------------------------------------------------------
    def check(self, model: nn.Module, layers: Sequence[TrackedLayer]) -> None:
        """One forward on a training and a query batch: hooks fire once per layer, the loss is per
        example, the query measurement works, sampled targets work for ``fisher="true"``. Raises
        ``ValueError`` naming what to change; leaves the model and the global random state as they were."""
        device = passes.model_device(model)
        tracker = LayerTracker(layers)
        with ExitStack() as stack:
            stack.enter_context(passes.fork_rng(device))
            stack.enter_context(passes.evaluation_mode(model))
            stack.enter_context(tracker)
            for what, dataset, collate in (("training", self.pool, self.pool_collate),
                                           ("query", self.queries, self.query_collate)):
                batch = passes.to_device(next(iter(self.loader(dataset, collate))), device)
                try:  # the loss / measurement too: e.g. labels out of range for the model's outputs
                    outputs = passes.forward(model, self.task, batch, tracker)
                    expected = (self.task.batch_size(batch),)
                    values = self.task.loss_from_outputs(outputs, batch) if what == "training" else \
                        self.task.measurement(model, batch)
                except TrackingError:
                    raise
                except Exception as err:
                    raise ValueError(f"the task cannot evaluate the model on a {what} batch ({type(err).__name__}: "
                                     f"{err}); check query_data / train_data or override Task.forward") from err
                if tuple(values.shape) != expected:
                    name = "loss" if what == "training" else "measurement"
                    raise ValueError(f"the task's {name} must be per example, shape {expected}, got "
                                     f"{tuple(values.shape)} on a {what} batch; return one value per example")
                if what == "training" and self.fisher == "true":
                    try:
                        self.task.sample_loss_from_outputs(outputs, batch, torch.Generator(device))
                    except NotImplementedError as err:
                        raise ValueError(f"fisher='true' needs a task that samples targets: {err}; "
                                         "use fisher='empirical'") from err

    # -- one checkpoint ------------------------------------------------------------------------------
    @passes.outside_inference_mode
    def fit_factors(self, model: nn.Module, statistics: CovarianceStatistics, *, step: int = 0) -> Factors:
        """The strategy's factors at the current weights, from covariances accumulated in training.
        Each process corrects the eigenvalues on its share of the correction examples; the sums are
        all-reduced (collective). ``step`` varies the sampled targets between checkpoints."""
        ids = self.correction_ids()
        share = ids[_share(len(ids))]
        seed = self.seed + step + _CORRECTION_TARGETS_OFFSET * distributed.rank()
        with passes.fork_rng(passes.model_device(model)):
            return fit_factors(model, self.task, self.pool_loader(share), self.strategy, self.fisher,
                               covariances=statistics, batch_size=self.batch_size, seed=seed,
                               show_progress=self.show_progress, reduce=distributed.all_reduce_sum_)

    @passes.outside_inference_mode
    def score(self, model: nn.Module, factors: Factors, *, step: Optional[int] = None, epoch: Optional[int] = None,
              per_layer: bool = False, per_token: bool = False, self_influence: bool = False,
              meta: Optional[Dict[str, Any]] = None) -> InfluenceResult:
        """Score the pool against the queries (each process its share; collective), then keep the
        per-token and per-layer scores of each query's ``top_k`` most positive and negative examples.
        Per layer over the whole pool only the sums ``layer_abs_sums [L, Q]`` (the layer
        distribution) are kept, unless ``per_layer`` asks for ``layer_scores [L, Q, N]``.

        Returns the same complete :class:`InfluenceResult` on every process; ``meta`` is merged into
        its metadata (with the run identity, timings and pool size)."""
        if per_token and distributed.world_size() > 1:
            raise ValueError("dense per_token scores are computed in a single process; score a subset offline")
        started = time.perf_counter()
        ids = self.pool_ids
        mine = ids[_share(len(ids))]
        device = passes.model_device(model)
        with passes.fork_rng(device):
            queries = self._prepared_queries(model, factors)
            self._kept_queries = (factors, queries[0]) if self.keep_prepared_queries else None
            prepared = time.perf_counter() - started
            part = compute_influence(
                model, self.task, self.pool_loader(mine), None, factors, self.damping,
                per_layer=per_layer, layer_sums=True, per_token=per_token, query_rank=self.query_rank,
                self_influence=self_influence, batch_size=self.batch_size, train_ids=mine, query_ids=self.query_ids,
                prepared_queries=queries, show_progress=self.show_progress,
            )
            tensors = _gathered(part, len(ids), device)
            timings = {"queries": prepared, "scores": time.perf_counter() - started}
            scores = tensors.pop("scores")
            stage = time.perf_counter()
            token_note = None
            if self.top_k:
                try:
                    tensors.update(self._top_examples(model, factors, scores, queries))
                except ValueError as err:  # e.g. layers reading different token axes
                    token_note = str(err)
            timings["token_scores"] = time.perf_counter() - stage
        result_meta = dict(part.meta)
        result_meta.update(
            n_train=len(ids), nonfinite_train_ids=_nonfinite_examples(scores, ids), n_pool=len(self.pool),
            world_size=distributed.world_size(),
            tokens_seen=factors.meta.get("tokens_seen"), token_scores_skipped=token_note,
            run=run_identity(model, self.task, ids, self.run_config),
            timings={**part.meta.get("timings", {}), **timings},
        )
        result_meta.update(meta or {})
        return InfluenceResult(scores=scores, train_ids=ids, query_ids=self.query_ids, layer_names=part.layer_names,
                               step=step, epoch=epoch, meta=result_meta, **tensors)

    def _prepared_queries(self, model: nn.Module, factors: Factors) -> Tuple[PreconditionedQueries, Tensor]:
        """The preconditioned queries, prepared once per checkpoint for the pool and its top examples."""
        layers = layers_by_name(model, factors.layer_names)
        return precondition_queries(model, self.task, self.query_loader(), factors.to(passes.model_device(model)),
                                    layers, factors.damping_per_layer(self.damping), self.query_rank,
                                    self.batch_size, self.show_progress)

    def take_prepared_queries(self, factors: Factors) -> Optional[PreconditionedQueries]:
        """The queries the last :meth:`score` preconditioned with ``factors`` (kept only with
        ``keep_prepared_queries``, and handed out once), or ``None``."""
        kept, self._kept_queries = self._kept_queries, None
        return kept[1] if kept is not None and kept[0] is factors else None

    def _top_examples(self, model: nn.Module, factors: Factors, scores: Tensor,
                      queries: Tuple[PreconditionedQueries, Tensor]) -> Dict[str, Tensor]:
        """Per query, the ``top_k`` most positive / negative examples' ids, per-token and per-layer
        scores, computed for the union of those examples only. Non-finite scores are never ranked: a query
        with fewer finite scores than ``top_k`` gets id -1 (and no token scores) in the gaps."""
        k = min(self.top_k, scores.shape[1])
        picked = {"top": finite_topk(scores, k).indices, "bottom": finite_topk(scores, k, largest=False).indices}
        positions = torch.cat(list(picked.values()), dim=1)
        union = positions[positions >= 0].unique()  # sorted positions in the pool id list
        if len(union) == 0:
            raise ValueError("no finite score to rank: per-token scores of the top examples are skipped")
        tokens = compute_influence(
            model, self.task, self.pool_loader(self.pool_ids[union]), None, factors, self.damping,
            per_layer=True, per_token=True, query_rank=self.query_rank, batch_size=self.batch_size,
            prepared_queries=queries,
        )
        rows = torch.arange(scores.shape[0]).unsqueeze(1)
        out = {}
        for name, chosen in picked.items():
            ranked = chosen >= 0
            where = torch.searchsorted(union, chosen.clamp_min(0)).clamp_max(len(union) - 1)
            out[f"{name}_ids"] = torch.where(ranked, self.pool_ids[chosen.clamp_min(0)], -1)
            out[f"{name}_token_scores"] = tokens.token_scores[rows, where] * ranked.unsqueeze(-1)
            out[f"{name}_token_mask"] = tokens.token_mask[where] & ranked.unsqueeze(-1)
            out[f"{name}_layer_scores"] = tokens.layer_scores[:, rows, where].masked_fill(~ranked, math.nan)
        return out

    def compute(self, model: nn.Module, statistics: CovarianceStatistics, *, step: int, epoch: Optional[int] = None,
                meta: Optional[Dict[str, Any]] = None) -> Tuple[InfluenceResult, Factors]:
        """:meth:`fit_factors` then :meth:`score`: the influence at one checkpoint (collective)."""
        started = time.perf_counter()
        factors = self.fit_factors(model, statistics, step=step)
        fitted = time.perf_counter() - started
        result = self.score(model, factors, step=step, epoch=epoch, self_influence=self.self_influence, meta=meta)
        result.meta["timings"] = {"factors": fitted, **result.meta["timings"]}
        return result, factors

    @staticmethod
    def write(result: InfluenceResult, factors: Factors, path: Union[str, os.PathLike],
              overwrite: bool = False) -> Path:
        """Write the result with its factors (``<path>/factors``) as one atomic directory; call on
        one process only."""
        return save_result_with_factors(path, result, factors, overwrite=overwrite)


def _share(total: int) -> slice:
    span = distributed.split_range(total)
    return slice(span.start, span.stop)


def _nonfinite_examples(scores: Tensor, ids: Tensor) -> List[int]:
    """Ids of the examples with a non-finite score for some query whose scores are not all
    non-finite (a broken query is reported on its own, not as a fault of every example)."""
    queries_ok = torch.isfinite(scores).any(1)
    return ids[(~torch.isfinite(scores[queries_ok])).any(0)].tolist()


def _gathered(part: InfluenceResult, total: int, device: torch.device) -> Dict[str, Tensor]:
    """Every process's share of the pool's score tensors, concatenated along the pool axis."""
    out = {}
    for name in ("scores", "layer_scores", "layer_abs_sums", "token_scores", "token_mask", "self_scores"):
        local = part.get(name)
        if local is None:
            continue
        if name == "layer_abs_sums":  # sums over each process's share of the pool
            total_sums = local.to(device)
            distributed.all_reduce_sum_([total_sums])
            out[name] = total_sums.cpu()
            continue
        if name in ("token_scores", "token_mask"):  # single-process only (see score)
            out[name] = local
            continue
        out[name] = distributed.gather_last_dim(local.to(device), total).cpu()
    return out


def choose_pool_ids(size: int, max_train_examples: Optional[int], seed: int) -> Tensor:
    """All pool indices, or a seeded random subset of ``max_train_examples`` of them, sorted."""
    if max_train_examples is None:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:max_train_examples].sort().values


def dataset_and_collate(data: Any, what: str) -> Tuple[Any, Optional[Callable]]:
    """A DataLoader's dataset and collate function, or a Dataset with no collate function of its own."""
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return data, None
    raise TypeError(f"{what} must be a Dataset or DataLoader, got {type(data).__name__}")


def prepare_output_dir(directory: Path) -> None:
    """Before a run writes results: refuse a directory that could never be written, and remove
    what interrupted writes of this project left there."""
    check_writable(directory)
    removed = remove_incomplete(directory)
    if removed:
        log.info("lightning-influence: removed %d incomplete result(s) left by an interrupted run in %s",
                 len(removed), directory)


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

    def add(self, step: int, epoch: Optional[int], reason: str) -> Dict[str, Any]:
        entry = {"step": step, "epoch": epoch, "reasons": [reason], "dir": f"step={step}", "checkpoint_paths": []}
        self.entries.append(entry)
        return entry

    def results(self) -> List[InfluenceResult]:
        """The saved results (tensors load lazily); entries whose directory is missing are skipped."""
        found = []
        for entry in self.entries:
            if self.output_dir is None or not is_saved_result(self.path(entry)):
                continue
            if entry["dir"] not in self._handles:
                self._handles[entry["dir"]] = InfluenceResult.load(self.path(entry))
            found.append(self._handles[entry["dir"]])
        return found

    def write_meta(self, entry: Dict[str, Any]) -> None:
        """Record the entry's reasons and checkpoint paths in its saved result (one process only)."""
        path = self.path(entry)
        if not is_saved_result(path):
            return
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
        self.entries = [_current_entry(entry) for entry in entries]
        for entry in self.entries:
            if entry.get("awaiting_checkpoint"):
                entry["restored"] = True


def _current_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """An index entry in today's layout: callback states of version 1 stored absolute paths."""
    entry = dict(entry)
    if "dir" not in entry:
        entry["dir"] = Path(entry.pop("path")).name
    return entry
