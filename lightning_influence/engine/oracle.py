"""Exact reference influence for tiny models: the dense damped Gauss-Newton, block by block.

Cost grows with the square of the parameter count, so this is for verification (tests, accuracy
benchmarks), not for use. Every vector here is a layer's gradient laid out as the engine sees it:
the matrix ``[d_out, d_in]`` (bias as the last input column) flattened row-major.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_influence.engine import passes
from lightning_influence.engine.factors import Factors
from lightning_influence.tasks import Task
from lightning_influence.engine.tracking import TrackedLayer, layers_by_name


def layer_matrix(layer: TrackedLayer, weight: Tensor, bias: Any = None) -> Tensor:
    """A layer's weight (or weight gradient) and bias as the engine's ``[d_out, d_in]`` matrix."""
    matrix = weight.T if layer.kind == "conv1d" else weight.reshape(weight.shape[0], -1)
    if bias is not None:
        matrix = torch.cat([matrix, bias.reshape(-1, 1)], dim=1)
    return matrix


def _flat_layer_gradients(target: Tensor, layers: Sequence[TrackedLayer], retain_graph: bool) -> List[Tensor]:
    params = []
    for layer in layers:
        params.append(layer.module.weight)
        if layer.has_bias:
            params.append(layer.module.bias)
    grads = iter(torch.autograd.grad(target, params, retain_graph=retain_graph, allow_unused=True))
    flat = []
    for layer in layers:
        weight = next(grads)
        bias = next(grads) if layer.has_bias else None
        weight = torch.zeros_like(layer.module.weight) if weight is None else weight
        if layer.has_bias and bias is None:
            bias = torch.zeros_like(layer.module.bias)
        flat.append(layer_matrix(layer, weight, bias).reshape(-1))
    return flat


def _single_examples(data: Any):
    loader = passes.as_loader(data, batch_size=1)
    if loader.batch_size != 1:
        loader = passes.as_loader(loader.dataset, batch_size=1)
    return loader


@dataclass
class DenseInfluence:
    """Exact block-diagonal influence and the curvature blocks it used."""

    scores: Tensor  # [Q, N]
    layer_scores: Tensor  # [L, Q, N]
    blocks: Dict[str, Tensor]  # per layer, the Gauss-Newton block G_ℓ [D_ℓ, D_ℓ] (no damping)
    train_grads: Dict[str, Tensor]  # [N, D_ℓ]
    query_grads: Dict[str, Tensor]  # [Q, D_ℓ] (gradients of minus the measurement)


def gauss_newton_blocks(model: nn.Module, task: Task, data: Any, layers: Sequence[TrackedLayer]) -> Dict[str, Tensor]:
    """``G_ℓ = (1/N) Σ_n J_nᵀ H_n J_n`` restricted to each layer, from the output Hessian's square root."""
    blocks = {layer.name: 0 for layer in layers}
    count = 0
    device = passes.model_device(model)
    with passes.evaluation_mode(model):
        for batch in _single_examples(data):
            batch = passes.to_device(batch, device)
            outputs = task.forward(model, batch)
            columns = task.output_hessian_sqrt(outputs, batch)
            for index, column in enumerate(columns):
                grads = _flat_layer_gradients((outputs * column).sum(), layers, retain_graph=index < len(columns) - 1)
                for layer, grad in zip(layers, grads):
                    blocks[layer.name] = blocks[layer.name] + torch.outer(grad, grad)
            count += 1
    return {name: block / count for name, block in blocks.items()}


def example_gradients(model: nn.Module, task: Task, data: Any, layers: Sequence[TrackedLayer],
                      measurement: bool = False) -> Dict[str, Tensor]:
    """Per-example gradients ``[N, D_ℓ]`` of the loss (or of minus the measurement)."""
    collected: Dict[str, List[Tensor]] = {layer.name: [] for layer in layers}
    device = passes.model_device(model)
    with passes.evaluation_mode(model):
        for batch in _single_examples(data):
            batch = passes.to_device(batch, device)
            target = -task.measurement(model, batch) if measurement else task.loss(model, batch)
            for layer, grad in zip(layers, _flat_layer_gradients(target.sum(), layers, retain_graph=False)):
                collected[layer.name].append(grad)
    return {name: torch.stack(grads) for name, grads in collected.items()}


def dense_influence(model: nn.Module, task: Task, train_data: Any, query_data: Any, layer_names: Sequence[str],
                    damping: Mapping[str, float], curvature_data: Any = None) -> DenseInfluence:
    """Exact influence ``Σ_ℓ ∇ℓ(q)_ℓᵀ (G_ℓ + λ_ℓ I)⁻¹ ∇ℓ(z)_ℓ`` with the Gauss-Newton ``G`` of
    ``curvature_data`` (default: ``train_data``) and per-layer damping ``λ_ℓ``."""
    layers = layers_by_name(model, layer_names)
    blocks = gauss_newton_blocks(model, task, curvature_data if curvature_data is not None else train_data, layers)
    train_grads = example_gradients(model, task, train_data, layers)
    query_grads = example_gradients(model, task, query_data, layers, measurement=True)
    per_layer = []
    for layer in layers:
        block = blocks[layer.name].double()
        damped = block + damping[layer.name] * torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
        solved = torch.linalg.solve(damped, train_grads[layer.name].double().T)  # [D, N]
        per_layer.append(query_grads[layer.name].double() @ solved)
    layer_scores = torch.stack(per_layer)
    return DenseInfluence(layer_scores.sum(0), layer_scores, blocks, train_grads, query_grads)


def factor_block(factors: Factors, name: str) -> Tensor:
    """The strategy's curvature block for one layer as a dense ``[D, D]`` matrix (undamped)."""
    parts = factors.layers[name]
    eigenvalues = factors.eigenvalues(name)
    if not factors.approximation.has_curvature:
        raise ValueError(f"the {factors.strategy} strategy has no curvature block")
    if not factors.has_eigenbasis:  # diagonal in the layer's coordinates
        return torch.diag(eigenvalues.reshape(-1))
    # vec_row(Q_S X Q_Aᵀ) = (Q_S ⊗ Q_A) vec_row(X)
    basis = torch.kron(parts["q_s"], parts["q_a"])
    return basis @ torch.diag(eigenvalues.reshape(-1).to(basis.dtype)) @ basis.T
