"""Per-example weight gradients ``ΔW_n = Σ_t g_nt a_ntᵀ`` of a linear layer from its activations and
output gradients, and the arithmetic every pass shares on them: squared sums, blocks small enough
for a core's cache, chunks bounded in memory, batched products with a layer's eigenbasis.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import torch
from torch import Tensor

# Bound on the elements of one intermediate tensor (per-example gradients [chunk, d_out, d_in] here,
# the direct contraction in scoring).
CHUNK_ELEMENTS = 2**24
# On the CPU, per-example gradients reduced right away (squared sums) are formed one block of rows
# of one example at a time, small enough to stay in a core's L2 cache (512 KiB in float32): forming
# a batch's [N, d_out, d_in] first and reducing it afterwards runs at memory speed (2.5-3.3x slower
# measured on GPT-sized layers, 16 examples of 64 tokens). Below ``BLOCKWISE_MIN_ELEMENTS`` per
# example the Python loop costs more than the memory traffic it saves.
EXAMPLE_BLOCK_ELEMENTS = 2**17
BLOCKWISE_MIN_ELEMENTS = 2**12


def squared_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``Σ_n (Σ_t g_nt a_ntᵀ)∘²`` for ``acts [N,T,d_in]``, ``grads [N,T,d_out]`` -> ``[d_out, d_in]``."""
    if acts.shape[1] == 1:
        return grads[:, 0].square().T @ acts[:, 0].square()
    total = grads.new_zeros(grads.shape[-1], acts.shape[-1])
    if blockwise(acts, grads):
        for _, rows, block in example_gradient_blocks(acts, grads):
            total[rows].addcmul_(block, block)
        return total
    for start, stop in chunk_ranges(acts.shape[0], grads.shape[-1] * acts.shape[-1]):
        gradients = per_example_gradients(acts[start:stop], grads[start:stop])
        total += torch.einsum("noi,noi->oi", gradients, gradients)  # no squared copy: 1.3-1.9x faster
    return total


def blockwise(acts: Tensor, grads: Tensor) -> bool:
    """Whether per-example gradients are best reduced block by block (:func:`example_gradient_blocks`)."""
    return acts.device.type == "cpu" and grads.shape[-1] * acts.shape[-1] >= BLOCKWISE_MIN_ELEMENTS


def example_gradient_blocks(acts: Tensor, grads: Tensor) -> Iterator[Tuple[int, slice, Tensor]]:
    """Each example's gradient ``Σ_t g_t a_tᵀ`` as ``(example, rows, block)``, ``EXAMPLE_BLOCK_ELEMENTS``
    at a time, for a caller that reduces each block before the next is formed (see the constant)."""
    step = max(1, EXAMPLE_BLOCK_ELEMENTS // acts.shape[-1])
    d_out = grads.shape[-1]
    for example in range(acts.shape[0]):
        example_grads, example_acts = grads[example].T, acts[example]
        for start in range(0, d_out, step):
            rows = slice(start, min(d_out, start + step))
            yield example, rows, example_grads[rows] @ example_acts


def per_example_gradients(acts: Tensor, grads: Tensor) -> Tensor:
    """``ΔW_n = Σ_t g_nt a_ntᵀ``: ``[N, d_out, d_in]``."""
    return torch.einsum("nto,nti->noi", grads, acts)


def stored_transposed(batch: Tensor) -> bool:
    """Whether ``batch [N, m, n]`` is the transposed view of a contiguous ``[N, n, m]`` (how dense
    preconditioned queries are kept: the rotation back to the layer's coordinates is faster in
    that orientation, and a copy to the other would cost as much as the gain)."""
    return batch.dim() == 3 and not batch.is_contiguous() and batch.transpose(1, 2).is_contiguous()


def left_multiply(matrix: Tensor, batch: Tensor) -> Tensor:
    """``matrix @ batch[n]`` for every n as one ``[m, k] x [k, N·n]`` product: a broadcast ``matrix @ batch``
    runs N smaller products (measured 1.5x slower on ``[2048, 2048] x [8, 2048, 513]``)."""
    count, rows, columns = batch.shape
    folded = batch.transpose(0, 1).reshape(rows, count * columns)
    return (matrix @ folded).view(matrix.shape[0], count, columns).transpose(0, 1)


def chunk_ranges(total: int, elements_per_item: int) -> Iterable[tuple]:
    """``(start, stop)`` slices of ``total`` items with at most ``CHUNK_ELEMENTS`` elements each, of
    equal sizes (16 GPT queries of 2048x513 as 8 and 8, not 15 and a lone one that runs every batched
    product again for a single matrix)."""
    most = max(1, CHUNK_ELEMENTS // max(1, elements_per_item))
    step = -(-total // -(-total // most)) if total else most  # ceil(total / number of chunks)
    for start in range(0, total, step):
        yield start, min(total, start + step)

