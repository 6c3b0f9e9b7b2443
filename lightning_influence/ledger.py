"""A per-step influence ledger (TracIn-style, curvature-preconditioned) and the training batches'
example ids it needs.

On each collected training step the tracker's hooks already hold every tracked layer's
activations and output gradients; the ledger contracts them with the queries preconditioned at the
last influence computation (rank-r factors, so a step costs ``O(B·T·Q·r·(d_in + d_out))`` per
layer) and adds, per training example and query,

    weight × ∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)        with weight = learning rate × collect_every_n_steps

(each collected step stands for the ``collect_every_n_steps`` steps around it). At the next
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
from typing import Any, Deque, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_influence import passes
from lightning_influence.scoring import PreconditionedQueries, contract, precondition_queries
from lightning_influence.tracking import TrackedLayer

# Rank of the preconditioned queries the ledger contracts with (unless query_rank is set): the
# paper's rank-32 queries reached Pearson 0.995 with full rank; 16 halves the per-step cost.
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
                f"ledger=True needs the training DataLoader's dataset indices, but {type(loader).__name__} has no "
                "batch sampler drawing from a sampler (an IterableDataset, batch_size=None, several training "
                "loaders, or a custom batch_sampler without .sampler); train from one map-style DataLoader or set "
                "ledger=False")
        if getattr(loader, "in_order", True) is False:
            raise ValueError("ledger=True needs batches in sampler order; the training DataLoader has in_order=False")
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


class InfluenceLedger:
    """Accumulates ``weight × score(query, example)`` over the collected training steps of a window.

    Feed it with :meth:`begin_batch` (ids and weight), :meth:`on_gradient` (from the collector's
    hooks, per-example gradients of the token-summed loss) and :meth:`commit` (once per optimizer
    step, after its batches: a skipped step is dropped); read and clear the window with
    :meth:`take`. Nothing is recorded before the first :meth:`refresh` (no queries yet).
    """

    def __init__(self) -> None:
        self.queries: Optional[PreconditionedQueries] = None
        self._batch: Optional[Tuple[Tensor, float]] = None  # ids and weight of the batch being recorded
        self._batch_scores: Optional[Tensor] = None  # [Q, B], summed over the layers seen so far
        self._step: List[Tuple[Tensor, Tensor]] = []  # the current optimizer step's batches
        self._chunks: List[Tuple[Tensor, Tensor]] = []
        self.steps = torch.zeros((), dtype=torch.float64)

    def refresh(self, queries: PreconditionedQueries) -> None:
        """Use ``queries`` from now on (after each influence computation)."""
        self.queries = queries

    def begin_batch(self, ids: Optional[Tensor], weight: float) -> None:
        self.end_batch()
        self._batch = (ids, float(weight)) if ids is not None and self.queries is not None else None
        self._batch_scores = None

    def on_gradient(self, layer: TrackedLayer, acts: Tensor, grads: Tensor) -> None:
        if self._batch is None:
            return
        with torch.no_grad():
            scores = contract(self.queries, layer, acts.float(), grads.float(), per_token=False)
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
            self._chunks = [self._merged()]

    def _merged(self) -> Tuple[Tensor, Tensor]:
        ids = torch.cat([ids for ids, _ in self._chunks])
        scores = torch.cat([scores for _, scores in self._chunks], dim=1)
        unique, position = ids.unique(return_inverse=True)
        total = scores.new_zeros(scores.shape[0], len(unique)).index_add_(1, position.to(scores.device), scores)
        return unique, total

    def take(self) -> Optional[Tuple[Tensor, Tensor]]:
        """The window's ``(ids [M], scores [Q, M])`` on the CPU, ids sorted (``None``: nothing
        recorded), and a new empty window."""
        if not self._chunks:
            return None
        ids, scores = self._merged()
        self._chunks = []
        return ids, scores.float().cpu()


@passes.outside_inference_mode
def ledger_queries(session: Any, model: torch.nn.Module, factors: Any, layers: List[TrackedLayer]
                   ) -> PreconditionedQueries:
    """The session's queries preconditioned with ``factors`` at the current weights, at rank
    ``session.query_rank`` or :data:`LEDGER_QUERY_RANK`: what the ledger scores steps against until
    the next computation."""
    device = passes.model_device(model)
    factors = factors.to(device)
    rank = session.query_rank or LEDGER_QUERY_RANK
    with passes.fork_rng(device):
        queries, _ = precondition_queries(model, session.task, session.query_loader(), factors, layers,
                                          factors.damping_per_layer(session.damping), rank, session.batch_size)
    return queries
