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
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import default_collate

from lightning_influence._deprecated import merged_group, regroup
from lightning_influence.config import CurvatureConfig, ScoringConfig, check_combination
from lightning_influence.engine import distributed
from lightning_influence.engine import passes
from lightning_influence.engine import sharding
from lightning_influence.engine.factors import Factors
from lightning_influence.engine.fitting import fit_factors
from lightning_influence.engine.statistics import CovarianceStatistics
from lightning_influence.results import (
    InfluenceResult,
    finite_topk,
    new_run_id,
    run_identity,
    save_result_with_factors,
)
from lightning_influence.checkpoint.pool import PoolStream, choose_pool_ids, dataset_and_collate
from lightning_influence.engine.queries import PreconditionedQueries, precondition_queries
from lightning_influence.engine.scoring import compute_influence
from lightning_influence.analysis.sketch import MOMENTS, NUM_BINS, ScoreSketch
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import LayerTracker, TrackedLayer, TrackingError, layers_by_name

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
            into the dataset. Or a streaming pool, an ``IterableDataset`` of mappings each holding a
            stable integer id under ``scoring.pool_id_key``: read in one pass per checkpoint, every
            process taking every ``world_size``-th item; its ids become the result's ``train_ids``.
        query_data: the queries: a Dataset or DataLoader.
        curvature: a :class:`~lightning_influence.CurvatureConfig` (or a dict of its fields): the
            session uses ``strategy``, ``fisher``, ``damping``, ``correction_batches``, ``refresh``,
            ``eigenbasis_dtype`` and ``shard_factors`` (in a process group, each layer's statistics,
            eigenbases and preconditioned queries live on one owning process; no effect in one process).
        scoring: a :class:`~lightning_influence.ScoringConfig` (or a dict of its fields):
            ``max_train_examples``, ``query_rank``, ``top_k``, ``keep_top_scores``, ``pool_id_key``,
            ``batch_size``, ``self_influence``.
        seed: seed of every private random generator.
        query_ids: dataset indices recorded for the queries (default ``0..Q-1``; e.g. the
            positions of a ``Subset`` of a validation set).
        pool_ids: which pool examples to score (default: all, or ``scoring.max_train_examples`` of them).
        show_progress: progress bars (pass ``False`` on all but one process).
        autocast: run the session's forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` / ``torch.float16``), as mixed-precision training steps run; the
            statistics, rotations and contractions stay float32 (see ``passes.mixed_precision``).
        run_config: the settings described in each result's ``meta["run"]``; default: this
            session's settings.
        run_id: the training run the results belong to (kept in ``meta["run"]["id"]`` and in the
            factors' ``meta["run_id"]``, so results scored later from them join the run); default:
            a new run (:func:`~lightning_influence.results.new_run_id`).
        **deprecated: the flat keywords of earlier releases (``strategy=``, ``top_k=``,
            ``curvature_refresh=``, ``eigenbasis_dtype=torch.float32`` ...), with a ``FutureWarning``.

    The groups are validated (each its own fields, then :func:`~lightning_influence.config.check_combination`),
    except that ``curvature.fisher`` may also be ``"exact"`` or ``None`` here (factors fitted offline).
    """

    def __init__(self, task: Task, train_data: Any, query_data: Any, *,
                 curvature: Optional[Union[CurvatureConfig, Dict[str, Any]]] = None,
                 scoring: Optional[Union[ScoringConfig, Dict[str, Any]]] = None, seed: int = 0,
                 query_ids: Optional[Sequence[int]] = None, pool_ids: Optional[Tensor] = None,
                 show_progress: bool = False, autocast: Optional[torch.dtype] = None,
                 run_config: Optional[Dict[str, Any]] = None, run_id: Optional[str] = None,
                 **deprecated: Any) -> None:
        curvature, scoring = _session_groups(curvature, scoring, deprecated)
        self.curvature, self.scoring = curvature, scoring
        self.autocast = passes.check_autocast(autocast)
        self.task = task
        self.pool, self.pool_collate = dataset_and_collate(train_data, "train_data")
        self.queries, self.query_collate = dataset_and_collate(query_data, "query_data")
        self.query_collate = self.query_collate or self.pool_collate
        self.streaming = isinstance(self.pool, IterableDataset)
        if not self.streaming and not hasattr(self.pool, "__len__"):
            raise ValueError(f"train_data ({type(self.pool).__name__}) has no __len__: pass a map-style Dataset, or "
                             "an IterableDataset whose items carry a stable integer id under pool_id_key")
        if not self.streaming and len(self.pool) == 0:
            raise ValueError("the candidate pool (train_data) is empty")
        if not hasattr(self.queries, "__len__") or len(self.queries) == 0:
            raise ValueError("the query set is empty; pass query_data with at least one example")
        max_train_examples = scoring.max_train_examples
        if not self.streaming and max_train_examples is not None and max_train_examples > len(self.pool):
            raise ValueError(f"scoring.max_train_examples={max_train_examples} is larger than the candidate pool "
                             f"({len(self.pool)} examples); lower it or set it to None")
        self.strategy, self.fisher, self.damping = curvature.strategy, curvature.fisher, curvature.damping
        self.correction_batches, self.curvature_refresh = curvature.correction_batches, curvature.refresh
        self.shard_factors, self.eigenbasis_dtype = curvature.shard_factors, getattr(torch, curvature.eigenbasis_dtype)
        self.query_rank, self.top_k, self.batch_size = scoring.query_rank, scoring.top_k, scoring.batch_size
        self.self_influence = scoring.self_influence
        self.keep_top_scores, self.pool_id_key = scoring.keep_top_scores, scoring.pool_id_key
        self.max_train_examples = max_train_examples
        self.seed, self.show_progress = seed, show_progress
        self.run_config = run_config if run_config is not None else {
            "strategy": self.strategy, "fisher": self.fisher, "damping": self.damping, "query_rank": self.query_rank,
            "correction_batches": self.correction_batches, "max_train_examples": max_train_examples, "seed": seed}
        self.run_id = run_id or new_run_id()
        self.query_ids = torch.as_tensor(list(query_ids) if query_ids is not None else range(len(self.queries)))
        if pool_ids is None and not self.streaming:
            pool_ids = choose_pool_ids(len(self.pool), max_train_examples, seed)
        self.pool_ids = pool_ids
        # Set by a second user of each computation's preconditioned queries (the ledger): score() then
        # keeps them for take_prepared_queries() rather than that user preparing them again.
        self.keep_prepared_queries = False
        self._kept_queries: Optional[Tuple[Factors, PreconditionedQueries]] = None

    @property
    def pool_ids(self) -> Optional[Tensor]:
        """Dataset indices of the scored pool examples, sorted (kept across checkpoints and resumes);
        of a streaming pool, the ids read at the last checkpoint (``None`` before it)."""
        return self._pool_ids

    @pool_ids.setter
    def pool_ids(self, ids: Optional[Tensor]) -> None:
        if ids is None or self.streaming:  # a stream's ids are whatever it yields at each checkpoint
            self._pool_ids = None if ids is None else torch.as_tensor(ids).long()
            return
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
        return self.loader(passes.PoolSubset(self.pool, torch.as_tensor(ids).tolist()))

    def pool_stream(self, limit: Optional[int], shard: bool = True, wanted: Optional[Tensor] = None,
                    rank: Optional[int] = None) -> "PoolStream":
        """A streaming pool's first ``limit`` items (at most ``max_train_examples``): this process's
        (or process ``rank``'s) share of them, or those whose id is in ``wanted`` (all processes alike)."""
        if self.max_train_examples is not None:
            limit = self.max_train_examples if limit is None else min(limit, self.max_train_examples)
        here = distributed.rank() if rank is None else rank
        world, here = (distributed.world_size(), here) if shard and wanted is None else (1, 0)
        return PoolStream(self.pool, self.pool_id_key, limit, world, here, wanted)

    def stream_share(self, stream: "PoolStream") -> Union[DataLoader, passes.Lockstep]:
        """This process's share of a streaming pool; with several processes, read in lockstep rounds
        (its length is unknown until read, and under FSDP every process must run as many passes),
        a process out of items running the stream's first item as a filler."""
        share = self.loader(stream)
        if distributed.world_size() == 1:
            return share
        return passes.Lockstep(share, None, filler=next(iter(self.loader(self.pool_stream(1, shard=False)))))

    def pool_share(self, ids: Tensor) -> Union[DataLoader, passes.Lockstep]:
        """This process's share of the pool examples ``ids``; with several processes, padded to as
        many batches as the largest share has (under FSDP every process must run as many passes)."""
        share = self.pool_loader(ids[_share(len(ids))])
        processes = distributed.world_size()
        if processes == 1:
            return share
        batches = math.ceil(math.ceil(len(ids) / processes) / self.batch_size)
        return passes.Lockstep(share, batches, filler=next(iter(self.pool_loader(ids[:1]))))

    def correction_ids(self) -> Tensor:
        """Fixed, seeded pool indices for the eigenvalue-correction pass."""
        if self.streaming:
            raise ValueError("a streaming pool has no random access: its eigenvalue-correction pass reads the "
                             "stream's first correction_batches batches (see correction_loader)")
        size = len(self.pool)
        count = size if self.correction_batches is None else min(size, self.correction_batches * self.batch_size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + _CORRECTION_SUBSET_OFFSET))
        return order[:count]

    def correction_loader(self) -> Union[DataLoader, passes.Lockstep]:
        """This process's share of the eigenvalue-correction examples: of a seeded random subset of
        the pool, or of a streaming pool's first ``correction_batches`` batches."""
        if self.streaming:
            return self.stream_share(self.pool_stream(self._stream_correction_limit()))
        return self.pool_share(self.correction_ids())

    def correction_shares(self) -> List[DataLoader]:
        """Every process's share of the eigenvalue-correction examples, by rank (sharded factors:
        each owner corrects its layers on all of them)."""
        if self.streaming:
            limit = self._stream_correction_limit()
            return [self.loader(self.pool_stream(limit, rank=r)) for r in range(distributed.world_size())]
        ids = self.correction_ids()
        return [self.pool_loader(ids[span.start:span.stop]) for span in _all_shares(len(ids))]

    def _stream_correction_limit(self) -> Optional[int]:
        return None if self.correction_batches is None else self.correction_batches * self.batch_size

    def memory_estimate(self, layers: Sequence[TrackedLayer]) -> str:
        """What the statistics and scores of this session will hold, for a log line."""
        stats_bytes = 2 * sum(layer.factor_bytes for layer in layers)  # statistics + one step's buffer
        n_query = len(self.queries)
        n_train = self.max_train_examples if self.streaming else len(self.pool_ids)
        sums_bytes = 8 * n_query * len(layers)
        if self.keep_top_scores is not None:
            kept_bytes = n_query * (2 * 12 * self.keep_top_scores + 8 * (len(MOMENTS) + 4 * NUM_BINS))
            scores = (f"scores {(kept_bytes + sums_bytes) / 2**20:.3g} MiB (top/bottom {self.keep_top_scores} per "
                      f"query and a sketch of the rest, {n_query} queries, and per-layer sums)")
        elif n_train is None:
            scores = (f"scores 4 bytes x {n_query} queries per streamed training example (set keep_top_scores "
                      "to bound them)")
        else:
            scores = (f"scores {(4 * n_query * n_train + sums_bytes) / 2**20:.3g} MiB ({n_query} queries x "
                      f"{n_train} training examples, and per-layer sums)")
        return f"tracking {len(layers)} layers; statistics {stats_bytes / 2**20:.3g} MiB, {scores}"

    # -- set-up check --------------------------------------------------------------------------------
    def check(self, model: nn.Module, layers: Sequence[TrackedLayer]) -> None:
        """One forward on a training and a query batch: hooks fire once per layer, the loss is per
        example, the query measurement works, sampled targets work for ``fisher="true"``. Raises
        ``ValueError`` naming what to change; leaves the model and the global random state as they were."""
        device = passes.model_device(model)
        tracker = LayerTracker(layers)
        with ExitStack() as stack:
            stack.enter_context(passes.fork_rng(device))
            stack.enter_context(passes.mixed_precision(self.autocast))  # the forwards as the checkpoints run them
            stack.enter_context(passes.evaluation_mode(model))
            stack.enter_context(tracker)
            first_pool_examples = self.pool_stream(self.batch_size, shard=False) if self.streaming else self.pool
            for what, dataset, collate in (("training", first_pool_examples, self.pool_collate),
                                           ("query", self.queries, self.query_collate)):
                try:
                    batch = passes.to_device(next(iter(self.loader(dataset, collate))), device)
                except StopIteration:
                    raise ValueError(f"the {what} data yielded no example; pass a non-empty train_data") from None
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
                        raise ValueError(f"curvature.fisher='true' needs a task that samples targets: {err}; "
                                         "use curvature.fisher='empirical'") from err

    # -- one checkpoint ------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        """Whether this checkpoint's factors are sharded across processes."""
        return self.shard_factors and distributed.world_size() > 1

    def reduce_statistics(self, collector: Any) -> CovarianceStatistics:
        """The statistics of a :class:`~lightning_influence.engine.collector.StepStatistics` summed over
        every process (collective): all layers on every process, or with sharding each layer on its
        owner only. The collector's own sums are left as they are."""
        if self.sharded:
            return sharding.reduce_to_owners(collector.stats, collector.layers,
                                             held_by_owners=collector.sharded)
        return collector.reduced()

    @passes.outside_inference_mode
    def fit_factors(self, model: nn.Module, statistics: CovarianceStatistics, *, step: int = 0,
                    layers: Optional[Sequence[TrackedLayer]] = None) -> Factors:
        """The strategy's factors at the current weights, from covariances accumulated in training
        (from :meth:`reduce_statistics`). Each process corrects the eigenvalues on its share of the
        correction examples; the sums are all-reduced (collective). ``step`` varies the sampled
        targets between checkpoints. Sharded, ``layers`` are every tracked layer (``statistics``
        hold this process's only) and each owner corrects its layers on every process's share."""
        seeds = [self.seed + step + _CORRECTION_TARGETS_OFFSET * r for r in range(distributed.world_size())]
        with passes.fork_rng(passes.model_device(model)), passes.mixed_precision(self.autocast):
            if self.sharded:
                if layers is None:
                    raise ValueError("sharded fit_factors needs layers=<every tracked layer>")
                return sharding.fit_sharded_factors(
                    model, self.task, statistics, layers, self.correction_shares(), seeds,
                    strategy=self.strategy, fisher=self.fisher,
                    batch_size=self.batch_size, eigenbasis_dtype=self.eigenbasis_dtype,
                    show_progress=self.show_progress, refresh=self.curvature_refresh)
            return fit_factors(model, self.task, self.correction_loader(), self.strategy, self.fisher,
                               covariances=statistics, batch_size=self.batch_size, seed=seeds[distributed.rank()],
                               show_progress=self.show_progress, reduce=distributed.all_reduce_sum_,
                               eigenbasis_dtype=self.eigenbasis_dtype, refresh=self.curvature_refresh)

    @passes.outside_inference_mode
    def score(self, model: nn.Module, factors: Factors, *, step: Optional[int] = None, epoch: Optional[int] = None,
              per_layer: bool = False, per_token: bool = False, self_influence: bool = False,
              meta: Optional[Dict[str, Any]] = None) -> InfluenceResult:
        """Score the pool against the queries (each process its share; collective), then keep the
        per-token and per-layer scores of each query's ``top_k`` most positive and negative examples.
        Per layer over the whole pool only the sums ``layer_abs_sums [L, Q]`` (the layer
        distribution) are kept, unless ``per_layer`` asks for ``layer_scores [L, Q, N]``; with
        ``keep_top_scores``, per query only its top/bottom scores and a sketch of the rest.

        Returns the same complete :class:`InfluenceResult` on every process; ``meta`` is merged into
        its metadata (with the run identity, timings and pool size)."""
        if per_token and distributed.world_size() > 1:
            raise ValueError("dense per_token scores are computed in a single process; score a subset offline")
        if self_influence and factors.is_sharded:
            raise ValueError("self_influence needs every layer's factors on every process; use shard_factors=False")
        started = time.perf_counter()
        device = passes.model_device(model)
        if self.streaming:
            stream = self.pool_stream(None)
            loader, mine = self.stream_share(stream), stream.ids  # the list fills while the stream is read
        else:
            mine = self.pool_ids[_share(len(self.pool_ids))]
            loader = self.pool_share(self.pool_ids)
        with passes.fork_rng(device), passes.mixed_precision(self.autocast):
            queries = self._prepared_queries(model, factors)
            self._kept_queries = (factors, queries[0]) if self.keep_prepared_queries else None
            prepared = time.perf_counter() - started
            part = compute_influence(
                model, self.task, loader, None, factors, self.damping,
                per_layer=per_layer, layer_sums=True, per_token=per_token, query_rank=self.query_rank,
                self_influence=self_influence, keep_top=self.keep_top_scores, batch_size=self.batch_size,
                train_ids=mine, query_ids=self.query_ids, prepared_queries=queries, show_progress=self.show_progress,
            )
            ids, tensors = self._gathered(part, device)
            if self.streaming:
                self.pool_ids = ids
            timings = {"queries": prepared, "scores": time.perf_counter() - started}
            scores = tensors.pop("scores", None)
            stage = time.perf_counter()
            token_note = None
            if self.top_k:
                try:
                    tensors.update(self._top_examples(model, factors, self._picked(scores, ids, tensors), queries))
                except ValueError as err:  # e.g. layers reading different token axes
                    token_note = str(err)
            timings["token_scores"] = time.perf_counter() - stage
        if scores is not None:
            nonfinite = _nonfinite_examples(scores, ids)
        else:
            found = distributed.gather_objects(part.meta["nonfinite_train_ids"])
            nonfinite = sorted(example for share in found for example in share)
        result_meta = dict(part.meta)
        result_meta.update(
            n_train=len(ids), nonfinite_train_ids=nonfinite, n_pool=len(ids) if self.streaming else len(self.pool),
            world_size=distributed.world_size(), keep_top_scores=self.keep_top_scores, streaming_pool=self.streaming,
            tokens_seen=factors.meta.get("tokens_seen"), token_scores_skipped=token_note,
            run=run_identity(model, self.task, ids, self.run_id, self.run_config),
            timings={**part.meta.get("timings", {}), **timings},
        )
        result_meta.update(meta or {})
        return InfluenceResult(scores=scores, train_ids=ids, query_ids=self.query_ids, layer_names=part.layer_names,
                               step=step, epoch=epoch, meta=result_meta, **tensors)

    def _gathered(self, part: InfluenceResult, device: torch.device) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The scored ids and every process's share of the pool's score tensors, put together: per
        example concatenated along the pool axis (a stream's sorted by id), per-layer sums added,
        sketches merged."""
        out: Dict[str, Tensor] = {}
        sums = part.get("layer_abs_sums")
        if sums is not None:  # sums over each process's share of the pool
            total_sums = sums.to(device)
            distributed.all_reduce_sum_([total_sums])
            out["layer_abs_sums"] = total_sums.cpu()
        for name in ("token_scores", "token_mask"):  # single-process only (see score)
            if part.get(name) is not None:
                out[name] = part.get(name)
        per_example = {name: part.get(name) for name in ("scores", "layer_scores", "self_scores")
                       if part.get(name) is not None}
        if self.streaming:
            pieces = distributed.gather_objects((part.train_ids, per_example))
            ids = torch.cat([piece_ids for piece_ids, _ in pieces])
            order = ids.argsort()
            ids = ids[order]
            repeated = ids[1:][ids[1:] == ids[:-1]].unique()
            if len(repeated):
                raise ValueError(f"the streaming pool yielded the ids {repeated[:10].tolist()} more than once; "
                                 f"each item needs a unique, stable integer under {self.pool_id_key!r}")
            for name in per_example:
                out[name] = torch.cat([fields[name] for _, fields in pieces], dim=-1)[..., order]
        else:
            ids = self.pool_ids
            for name, local in per_example.items():
                out[name] = distributed.gather_last_dim(local.to(device), len(ids)).cpu()
        sketch = ScoreSketch.of(part)
        if sketch is not None:
            out.update(ScoreSketch.merge(distributed.gather_objects(sketch)).fields())
        return ids, out

    def _picked(self, scores: Optional[Tensor], ids: Tensor, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Per query, the train ids of the ``top_k`` most positive / negative finite scores (-1: none)."""
        if scores is None:  # taken from the kept scores (keep_top_scores >= top_k)
            return {side: tensors[f"kept_{side}_ids"][:, :self.top_k] for side in ("top", "bottom")}
        k = min(self.top_k, scores.shape[1])
        picked = {}
        for side, largest in (("top", True), ("bottom", False)):
            positions = finite_topk(scores, k, largest=largest).indices
            picked[side] = torch.where(positions >= 0, ids[positions.clamp_min(0)], -1)
        return picked

    def _prepared_queries(self, model: nn.Module, factors: Factors) -> Tuple[PreconditionedQueries, Tensor]:
        """The preconditioned queries, prepared once per checkpoint for the pool and its top examples."""
        layers = layers_by_name(model, factors.layer_names)
        factors = factors.to(passes.model_device(model))
        if factors.is_sharded:
            return sharding.precondition_sharded_queries(
                model, self.task, self.query_loader(), factors, layers, factors.damping_per_layer(self.damping),
                self.query_rank, self.batch_size, self.show_progress)
        return precondition_queries(model, self.task, self.query_loader(), factors,
                                    layers, factors.damping_per_layer(self.damping), self.query_rank,
                                    self.batch_size, self.show_progress)

    def take_prepared_queries(self, factors: Factors) -> Optional[PreconditionedQueries]:
        """The queries the last :meth:`score` preconditioned with ``factors`` (kept only with
        ``keep_prepared_queries``, and handed out once), or ``None``."""
        kept, self._kept_queries = self._kept_queries, None
        return kept[1] if kept is not None and kept[0] is factors else None

    def _top_examples(self, model: nn.Module, factors: Factors, picked: Dict[str, Tensor],
                      queries: Tuple[PreconditionedQueries, Tensor]) -> Dict[str, Tensor]:
        """Per query, the ``picked`` top / bottom examples' ids, per-token and per-layer scores,
        computed for the union of those examples only (a streaming pool is read again for them).
        A gap (id -1: fewer finite scores than ``top_k``) gets no token scores."""
        chosen = torch.cat(list(picked.values()), dim=1)
        union = chosen[chosen >= 0].unique()  # sorted ids
        if len(union) == 0:
            raise ValueError("no finite score to rank: per-token scores of the top examples are skipped")
        if self.streaming:
            stream = self.pool_stream(None, wanted=union)
            items = list(stream)
            read_ids = torch.as_tensor(stream.ids, dtype=torch.long)
            if not torch.equal(read_ids.sort().values, union):
                raise ValueError("the streaming pool did not yield the same examples when read again for the top "
                                 "examples' token scores: it must be deterministic")
            loader = self.loader([items[i] for i in read_ids.argsort().tolist()])  # in the order of union
        else:
            loader = self.pool_loader(union)
        ranked = chosen >= 0
        positions = torch.searchsorted(union, chosen.clamp_min(0)).clamp_max(len(union) - 1)  # in union
        rows = torch.arange(chosen.shape[0]).unsqueeze(1)
        # Token scores only where they are shown: each query's own top and bottom examples.
        pairs = torch.zeros(chosen.shape[0], len(union), dtype=torch.bool)
        pairs[rows.expand_as(chosen)[ranked], positions[ranked]] = True
        tokens = compute_influence(
            model, self.task, loader, None, factors, self.damping,
            per_layer=True, per_token=True, token_pairs=pairs, query_rank=self.query_rank,
            batch_size=self.batch_size, prepared_queries=queries,
        )
        out = {}
        widths = [ids.shape[1] for ids in picked.values()]
        for (name, ids), where, listed in zip(picked.items(), positions.split(widths, 1), ranked.split(widths, 1)):
            out[f"{name}_ids"] = ids
            out[f"{name}_token_scores"] = tokens.token_scores[rows, where] * listed.unsqueeze(-1)
            out[f"{name}_token_mask"] = tokens.token_mask[where] & listed.unsqueeze(-1)
            out[f"{name}_layer_scores"] = tokens.layer_scores[:, rows, where].masked_fill(~listed, math.nan)
        return out

    def compute(self, model: nn.Module, statistics: CovarianceStatistics, *, step: int, epoch: Optional[int] = None,
                meta: Optional[Dict[str, Any]] = None,
                layers: Optional[Sequence[TrackedLayer]] = None) -> Tuple[InfluenceResult, Factors]:
        """:meth:`fit_factors` then :meth:`score`: the influence at one checkpoint (collective)."""
        started = time.perf_counter()
        factors = self.fit_factors(model, statistics, step=step, layers=layers)
        factors.meta["run_id"] = self.run_id  # scores computed from these factors later belong to this run
        fitted = time.perf_counter() - started
        result = self.score(model, factors, step=step, epoch=epoch, self_influence=self.self_influence, meta=meta)
        result.meta["timings"] = {"factors": fitted, **result.meta["timings"]}
        if "curvature" in factors.meta:
            result.meta["curvature"] = factors.meta["curvature"]
        return result, factors

    @staticmethod
    def write(result: InfluenceResult, factors: Factors, path: Union[str, os.PathLike],
              overwrite: bool = False) -> Path:
        """Write the result with its factors (``<path>/factors``) as one atomic directory; call on
        one process only (sharded factors: after :meth:`stage_factors` on every process)."""
        return save_result_with_factors(path, result, factors, overwrite=overwrite)

    @staticmethod
    def stage_factors(factors: Factors, path: Union[str, os.PathLike]) -> None:
        """Before :meth:`write` of sharded factors: every process writes its layers next to
        ``path`` (a file system all processes share), for process 0 to move in (collective; a
        no-op for factors that are not sharded)."""
        if factors.is_sharded:
            factors.stage_shards(path)


def _share(total: int) -> slice:
    span = distributed.split_range(total)
    return slice(span.start, span.stop)


def _all_shares(total: int) -> List[range]:
    """Every process's share of ``range(total)``, by rank."""
    return [distributed.split_range(total, r) for r in range(distributed.world_size())]


def _nonfinite_examples(scores: Tensor, ids: Tensor) -> List[int]:
    """Ids of the examples with a non-finite score for some query whose scores are not all
    non-finite (a broken query is reported on its own, not as a fault of every example)."""
    queries_ok = torch.isfinite(scores).any(1)
    return ids[(~torch.isfinite(scores[queries_ok])).any(0)].tolist()


def _session_groups(curvature: Any, scoring: Any, deprecated: Dict[str, Any]) -> Tuple[CurvatureConfig, ScoringConfig]:
    """The session's two groups, validated (the flat keywords of earlier releases moved into them, with
    a ``FutureWarning``): each group's own rules, then the rules across them."""
    if isinstance(deprecated.get("eigenbasis_dtype"), torch.dtype):  # the session took a torch.dtype
        deprecated["eigenbasis_dtype"] = str(deprecated["eigenbasis_dtype"]).replace("torch.", "")
    settings = regroup(dict(deprecated, curvature=curvature, scoring=scoring), "InfluenceSession", stacklevel=4)
    unknown = sorted(set(settings) - {"curvature", "scoring"})
    if unknown:
        raise TypeError(f"InfluenceSession() got unexpected keyword arguments {unknown}")
    curvature = CurvatureConfig.coerce(settings["curvature"])
    scoring = ScoringConfig.coerce(settings["scoring"]).validate()
    fisher = curvature.fisher
    if fisher in ("exact", None):  # factors fitted offline (the CLI's score): the fisher of the correction pass
        curvature = merged_group(curvature, {"fisher": "empirical"}).validate()
        curvature.fisher = fisher
    else:
        curvature.validate()
    check_combination(curvature, scoring)
    return curvature, scoring
