"""A per-step influence ledger (TracIn-style, curvature-preconditioned) and the training batches'
example ids it needs.

On each collected training step the tracker's hooks already hold every tracked layer's
activations and output gradients; the ledger contracts them with the queries preconditioned at the
last influence computation and adds, per training example and query,

    weight × ∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)    with weight = learning rate × curvature.collect_every_n_steps

(each collected step stands for the ``curvature.collect_every_n_steps`` steps around it). The ledger's
queries are those preconditioned queries (rank :data:`LEDGER_QUERY_RANK`) projected, per layer, onto
one subspace shared by all queries: the top ``k`` (``scoring.ledger=k``, e.g. 32; 0: no projection, the
exact ledger) left and right singular directions of the stacked queries, measured in the metric of the
training gradients (the curvature's eigenbases and second moments; exact when a layer's queries span no more). On the digits LDS this
metric lifted the ledger from 0.646 to 0.674 against 0.697 without any projection
(``benchmarks/ledger_lds.py``). A batch then costs
``O(B·T·k·(d_in + d_out) + B·Q·k²)`` per layer: two thin GEMMs, one batched ``k × k`` outer
product, and no per-example gradient (on the overhead benchmark's transformer, 64 queries: 0.14 of
a training step per collected batch, against 0.56 for the rank-16 queries themselves). The share of
the queries' squared norm the subspace keeps is stored with each result
(``meta["ledger"]["captured"]``, per layer). At the next
computation the window's sums — "which examples moved this query since the last checkpoint" —
are stored with the result (``ledger_ids``, ``ledger_scores``) and the queries are re-preconditioned
with the new factors (the preconditioner is refreshed at each computation, the only time the
eigenbasis exists; before the first one the plain query gradients are used: TracIn itself).
Storage is sparse: only the examples the collected steps saw. The query gradients are those of the
last computation's weights (recomputing them every step would cost a pass over the queries).

Example ids: the hooks see tensors, not dataset indices. :class:`BatchIds` wraps the training
DataLoader's sampler and reads the indices as the sampler yields them (batches arrive in sampler
order, also with worker processes and Lightning's distributed sampler), so shuffled loaders work.
Refused: loaders without a sampler of indices (iterable datasets, ``batch_size=None``) and
``in_order=False`` loaders (batches out of sampler order).

Plain PyTorch: no Lightning, W&B or reporting import.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_influence.engine import distributed
from lightning_influence.engine import passes
from lightning_influence.engine.queries import PreconditionedQueries, precondition_queries
from lightning_influence.engine.tracking import TrackedLayer

# Rank of the preconditioned queries before their projection (unless query_rank is set): the
# paper's rank-32 queries reached Pearson 0.995 with full rank.
LEDGER_QUERY_RANK = 16
# Per-batch chunks kept before merging repeated example ids (bounds memory between computations).
_MERGE_EVERY = 64


class _RecordingSampler(Sampler):
    """Yields the wrapped sampler's indices and appends each to ``queue``; a new pass (epoch)
    starts an empty queue. Other attributes (``set_epoch``) reach the wrapped sampler."""

    def __init__(self, inner: Any, queue: Deque[int]) -> None:
        self.inner, self.queue = inner, queue

    def __iter__(self) -> Iterator[Any]:
        self.queue.clear()  # indices prefetched past the end of the previous pass were never trained on
        for index in self.inner:
            self.queue.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


class BatchIds:
    """Dataset indices of each training batch of ``loader``, in the order the batches arrive.

    Raises:
        ValueError: when the loader's batches cannot be traced to dataset indices.
    """

    def __init__(self, loader: Any) -> None:
        batch_sampler = getattr(loader, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        if not isinstance(loader, DataLoader) or inner is None or isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                f"scoring.ledger needs the training DataLoader's dataset indices, but {type(loader).__name__} has no "
                "batch sampler drawing from a sampler (an IterableDataset, batch_size=None, several training "
                "loaders, or a custom batch_sampler without .sampler); train from one map-style DataLoader or set "
                "scoring.ledger=None")
        if getattr(loader, "in_order", True) is False:
            raise ValueError("scoring.ledger needs batches in sampler order; the training DataLoader has "
                             "in_order=False")
        self._queue: Deque[int] = deque()
        self._batch_sampler, self._inner = batch_sampler, inner
        batch_sampler.sampler = _RecordingSampler(inner, self._queue)

    def next_batch(self, size: int) -> Optional[Tensor]:
        """The ids of the next batch of ``size`` examples, or ``None`` when the sampler did not yield
        them (the DataLoader was replaced, e.g. by ``reload_dataloaders_every_n_epochs``)."""
        if len(self._queue) < size:
            self._queue.clear()
            return None
        return torch.tensor([self._queue.popleft() for _ in range(size)], dtype=torch.long)

    def release(self) -> None:
        """Give the DataLoader its own sampler back."""
        self._batch_sampler.sampler = self._inner


class SubspaceQueries:
    """Preconditioned queries projected, per layer, onto ``k`` shared directions per side: query
    ``q`` is scored as ``⟨C_q, Σ_t (Uᵀ g_t)(Vᵀ a_t)ᵀ⟩`` with ``U [d_out, k]``, ``V [d_in, k]``.

    The directions are the leading singular directions of the stacked queries, measured in the
    metric of the training gradients when ``scales`` gives it per layer (``(q_s, s, q_a, a)``:
    eigenbases and second moments of the output gradients and activations): they keep what the
    scores of training examples see, not merely what is large in the queries. A side with at most
    ``size`` dimensions (any, with ``None``) is kept whole (exact)."""

    def __init__(self, queries: PreconditionedQueries, size: Optional[int],
                 scales: Optional[Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]]] = None) -> None:
        self.num_queries = queries.num_queries
        self.bases: Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]] = {}
        self.cores: Dict[str, Tensor] = {}  # [Q, k_out·k_in]
        self._in_width: Dict[str, int] = {}  # k_in (d_in when that side is kept whole)
        self.captured: Dict[str, float] = {}  # share of the queries' (gradient-weighted) squared norm kept
        for name in list(queries.dense) + list(queries.low_rank):
            left, right = queries.low_rank.get(name) or (queries.dense[name], None)
            dtype = left.dtype
            layer_scales = (scales or {}).get(name)
            out_side, in_side = (_Side(*layer_scales[:2]), _Side(*layer_scales[2:])) if layer_scales else (None, None)
            u, v, core, self.captured[name] = _project(left, right, size, out_side, in_side)
            self.bases[name] = (None if u is None else u.to(dtype), None if v is None else v.to(dtype))
            self.cores[name] = core.flatten(1).to(dtype)
            self._in_width[name] = core.shape[2]

    def dense_for(self, name: str) -> Tensor:
        """Layer ``name``'s projected queries ``[Q, d_out, d_in]`` (what the ledger scores with)."""
        u, v = self.bases[name]
        core = self.cores[name].view(self.num_queries, -1, self._in_width[name])
        core = core if u is None else u @ core
        return core if v is None else core @ v.T

    def scores(self, layer: TrackedLayer, acts: Tensor, grads: Tensor) -> Tensor:
        """``[Q, B]`` for a batch's ``acts [B, T, d_in]`` and per-example output gradients ``[B, T, d_out]``."""
        u, v = self.bases[layer.name]
        core = self.cores[layer.name]
        grads = grads if u is None else grads @ u.to(grads.device)
        acts = acts if v is None else acts @ v.to(acts.device)
        per_example = grads.transpose(1, 2) @ acts  # [B, k_out, k_in]
        return core.to(per_example) @ per_example.flatten(1).T


class _Side:
    """One side's metric ``M = q diag(√scale) qᵀ``, in which its directions are chosen; applied
    without forming the ``d × d`` matrix."""

    def __init__(self, basis: Tensor, scale: Tensor) -> None:
        self.basis = basis.double()
        self.root = scale.double().clamp_min(float(scale.max()) * 1e-12 + 1e-30).sqrt()

    def metric(self, x: Tensor) -> Tensor:
        return self.basis @ (self.root[:, None] * (self.basis.T @ x))

    def inverse(self, x: Tensor) -> Tensor:
        return self.basis @ ((self.basis.T @ x) / self.root[:, None])


def _project(left: Tensor, right: Optional[Tensor], size: Optional[int], out_side: Optional[_Side],
             in_side: Optional[_Side]) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor, float]:
    """One layer's queries, dense ``left [Q, d_out, d_in]`` (``right=None``) or ``left @ rightᵀ``:
    the bases ``U``, ``V`` that score (``None``: that side kept whole), the cores
    ``[Q, k_out, k_in]`` and the share of the queries' squared norm (in the metric) they keep.

    With ``M`` each side's metric and ``u``, ``v`` the leading singular directions of the stacked
    ``M P M``: ``P ≈ M⁻¹u · uᵀ(M P M)v · vᵀM⁻¹``, so the cores are ``uᵀ M P M v`` and the inputs
    are mapped by ``M⁻¹u`` and ``M⁻¹v``."""
    out_metric = (lambda x: x) if out_side is None else out_side.metric
    in_metric = (lambda x: x) if in_side is None else in_side.metric
    left = out_metric(left.double())
    if right is None:
        weighted = in_metric(left.transpose(1, 2)).transpose(1, 2)  # M P M, [Q, d_out, d_in]
        out_stack, in_stack = weighted.permute(1, 0, 2).flatten(1), weighted.permute(2, 0, 1).flatten(1)
    else:  # M P M = (M L)(M R)ᵀ: stack each side's factor times the square root of the other's Gram matrix
        right = in_metric(right.double())
        out_stack = (left @ _psd_root(right.transpose(1, 2) @ right)).permute(1, 0, 2).flatten(1)
        in_stack = (right @ _psd_root(left.transpose(1, 2) @ left)).permute(1, 0, 2).flatten(1)
    u, v = _leading_directions(out_stack, size), _leading_directions(in_stack, size)
    if right is None:
        core = weighted if u is None else u.T @ weighted
        core = core if v is None else core @ v
    else:
        core = (left if u is None else u.T @ left) @ (right if v is None else v.T @ right).transpose(1, 2)
    total = float(out_stack.pow(2).sum())
    # A share: clipped, since the two sums of the same squares round differently when nothing is dropped.
    captured = min(1.0, float(core.pow(2).sum()) / total) if total > 0 else 1.0
    # Sides kept whole score the inputs as they are: take their metric back out of the cores.
    if u is None and out_side is not None:
        core = out_side.inverse(core)
    if v is None and in_side is not None:
        core = in_side.inverse(core.transpose(1, 2)).transpose(1, 2)
    apply_out = u if u is None or out_side is None else out_side.inverse(u)
    apply_in = v if v is None or in_side is None else in_side.inverse(v)
    return apply_out, apply_in, core, captured


def _psd_root(matrices: Tensor) -> Tensor:
    """Symmetric square roots of positive semi-definite ``[..., r, r]`` matrices."""
    values, vectors = torch.linalg.eigh(matrices)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def _leading_directions(stack: Tensor, size: Optional[int]) -> Optional[Tensor]:
    """The ``size`` leading left singular vectors of ``stack [d, n]`` (``None``: ``size`` covers
    all ``d``), from the smaller of its two Gram matrices."""
    dim, count = stack.shape
    if size is None or size >= dim:
        return None
    if count >= dim:
        return torch.linalg.eigh(stack @ stack.T)[1][:, -size:]
    values, vectors = torch.linalg.eigh(stack.T @ stack)
    values, vectors = values[-size:], vectors[:, -size:]
    keep = values > values.max().clamp_min(0) * 1e-12  # directions the stack has at all
    return stack @ vectors[:, keep] / values[keep].sqrt()


class InfluenceLedger:
    """Accumulates ``weight × score(query, example)`` over the collected training steps of a window.

    Feed it with :meth:`begin_batch` (ids and weight), :meth:`on_gradient` (from the collector's
    hooks, per-example gradients of the token-summed loss) and :meth:`commit` (once per optimizer
    step, after its batches: a skipped step is dropped); read and clear the window with
    :meth:`take`. Nothing is recorded before the first :meth:`refresh` (no queries yet).
    """

    def __init__(self) -> None:
        self.queries: Optional[SubspaceQueries] = None
        self._batch: Optional[Tuple[Tensor, float]] = None  # ids and weight of the batch being recorded
        self._batch_scores: Optional[Tensor] = None  # [Q, B], summed over the layers seen so far
        self._step: List[Tuple[Tensor, Tensor]] = []  # the current optimizer step's batches
        self._chunks: List[Tuple[Tensor, Tensor]] = []
        self.steps = torch.zeros((), dtype=torch.float64)

    def refresh(self, queries: SubspaceQueries) -> None:
        """Use ``queries`` from now on (after each influence computation)."""
        self.queries = queries

    def begin_batch(self, ids: Optional[Tensor], weight: float) -> None:
        self.end_batch()
        self._batch = (ids, float(weight)) if ids is not None and self.queries is not None else None
        self._batch_scores = None

    def on_gradient(self, layer: TrackedLayer, acts: Tensor, grads: Tensor, grad_factor: Any = 1.0) -> None:
        """Score one layer of the recorded batch; ``grad_factor`` turns ``grads`` into gradients of
        each example's token-summed loss (applied to the scores: they are linear in it)."""
        if self._batch is None:
            return
        with torch.no_grad():
            scores = self.queries.scores(layer, acts.float(), grads.float()) * grad_factor
        self._batch_scores = scores if self._batch_scores is None else self._batch_scores + scores

    def end_batch(self) -> None:
        if self._batch is not None and self._batch_scores is not None:
            ids, weight = self._batch
            self._step.append((ids, self._batch_scores.mul(weight)))
        self._batch, self._batch_scores = None, None

    def commit(self, valid: Any = True) -> None:
        """End an optimizer step; ``valid`` (bool or bool tensor, no host sync) drops a skipped step."""
        self.end_batch()
        if self._step:
            keep = torch.as_tensor(valid)
            self._chunks += [(ids, scores * keep.to(scores)) for ids, scores in self._step]
            self.steps = self.steps + keep.double().cpu()
        self._step = []
        if len(self._chunks) > _MERGE_EVERY:
            self._chunks = [_merged(self._chunks)]

    def take(self) -> Optional[Tuple[Tensor, Tensor]]:
        """The window's ``(ids [M], scores [Q, M])`` of every process (each recorded its own
        batches) on the CPU, ids sorted (``None``: nothing recorded), and a new empty window.
        Collective: call on every process."""
        local = [tuple(t.cpu() for t in _merged(self._chunks))] if self._chunks else []
        self._chunks = []
        windows = [chunk for chunks in distributed.gather_objects(local) for chunk in chunks]
        if not windows:
            return None
        ids, scores = _merged(windows)
        return ids, scores.float()


def _merged(chunks: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """One ``(ids, scores)`` of several, ids sorted and unique, the scores of repeated ids added."""
    ids = torch.cat([ids for ids, _ in chunks])
    scores = torch.cat([scores for _, scores in chunks], dim=1)
    unique, position = ids.unique(return_inverse=True)
    total = scores.new_zeros(scores.shape[0], len(unique)).index_add_(1, position.to(scores.device), scores)
    return unique, total


@passes.outside_inference_mode
def ledger_queries(session: Any, model: torch.nn.Module, factors: Any, layers: List[TrackedLayer],
                   subspace: Optional[int]) -> SubspaceQueries:
    """The session's queries preconditioned with ``factors`` at the current weights, at rank
    ``session.query_rank`` or :data:`LEDGER_QUERY_RANK`, projected onto their shared ``subspace``:
    what the ledger scores steps against until the next computation. With ``query_rank`` set these
    are the queries the session's scoring just prepared (kept for the ledger), not a second pass."""
    device = passes.model_device(model)
    queries = session.take_prepared_queries(factors) if session.query_rank else None
    factors = factors.to(device)
    if queries is None:
        rank = session.query_rank or LEDGER_QUERY_RANK
        with passes.fork_rng(device):
            queries, _ = precondition_queries(model, session.task, session.query_loader(), factors, layers,
                                              factors.damping_per_layer(session.damping), rank, session.batch_size)
    return SubspaceQueries(queries, subspace, _gradient_scales(factors) if factors.has_eigenbasis else None)


def _gradient_scales(factors: Any) -> Dict[str, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per layer ``(q_s, s, q_a, a)``: the eigenbases and, along them, the second moments of the output
    gradients and activations (the eigenvalues' row and column means: exact for K-FAC's outer
    product, EK-FAC's corrected ones marginalised)."""
    scales = {}
    for name in factors.layer_names:
        q_s, q_a = factors.eigenbasis(name)
        eigenvalues = factors.eigenvalues(name).double()
        scales[name] = (q_s, eigenvalues.mean(1), q_a, eigenvalues.mean(0))
    return scales
