"""Dense damped Gauss-Newton influence for the accuracy benchmarks, vectorised with torch.func.

``lightning_influence.engine.oracle`` is the reference the tests use; it loops over examples and output
dimensions, which takes minutes at benchmark sizes (hundreds of examples). This is the same
quantity for softmax cross-entropy models, from one batched Jacobian per data set:
``G_ℓ = (1/N) Σ_n J_nℓᵀ (diag p_n − p_n p_nᵀ) J_nℓ`` and per-example gradients ``J_nᵀ (p_n − e_y)``,
laid out as the engine's ``[d_out, d_in]`` matrices (bias as the last column). The smoke test
checks it against the reference.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lightning_influence.engine.tracking import layers_by_name


class DenseGaussNewton:
    """Exact Gauss-Newton blocks of ``model``'s tracked linear layers on ``(x, y)``.

    Args:
        model: a classifier returning logits (evaluated in float64).
        layer_names: the tracked ``nn.Linear`` modules (e.g. ``factors.layer_names``).
        x, y: the training examples; they define both ``G`` and the candidate gradients.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], x: Tensor, y: Tensor) -> None:
        self.model = model
        self.layers = layers_by_name(model, layer_names)
        if any(layer.kind != "linear" for layer in self.layers):
            raise ValueError("the benchmark oracle handles nn.Linear layers only")
        jac, probs = self._jacobians(x)
        self.blocks = {}
        self.train_grads = self._example_gradients(jac, probs, y)
        hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)  # [N, C, C]
        for name, j in jac.items():  # j: [N, C, D]
            self.blocks[name] = torch.einsum("ncd,nce->de", j, hessian @ j) / len(x)

    def _jacobians(self, x: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
        """Per example and layer, d logits / d [W | b] flattened: ``[N, C, D]``; and softmax ``[N, C]``."""
        params = {k: v.detach().double() for k, v in self.model.named_parameters()}

        def logits(p: Dict[str, Tensor], example: Tensor) -> Tensor:
            return functional_call(self.model, p, (example.unsqueeze(0),))[0]

        wanted = {}
        for layer in self.layers:
            wanted[f"{layer.name}.weight"] = params[f"{layer.name}.weight"]
            if layer.has_bias:
                wanted[f"{layer.name}.bias"] = params[f"{layer.name}.bias"]
        rest = {k: v for k, v in params.items() if k not in wanted}
        jac = vmap(jacrev(lambda w, ex: logits({**rest, **w}, ex)), in_dims=(None, 0))(wanted, x.double())
        with torch.no_grad():
            probs = torch.softmax(functional_call(self.model, params, (x.double(),)), -1)
        per_layer = {}
        for layer in self.layers:
            weight = jac[f"{layer.name}.weight"]  # [N, C, d_out, d_in]
            parts = [weight] + ([jac[f"{layer.name}.bias"].unsqueeze(-1)] if layer.has_bias else [])
            per_layer[layer.name] = torch.cat(parts, -1).flatten(2)
        return per_layer, probs

    @staticmethod
    def _example_gradients(jac: Mapping[str, Tensor], probs: Tensor, y: Tensor) -> Dict[str, Tensor]:
        """Gradient of each example's cross-entropy: ``J_nᵀ (p_n − e_y)`` -> ``[N, D]`` per layer."""
        residual = probs - F.one_hot(y, probs.shape[-1]).to(probs.dtype)
        return {name: torch.einsum("ncd,nc->nd", j, residual) for name, j in jac.items()}

    def mean_eigenvalue(self, name: str) -> float:
        block = self.blocks[name]
        return float(block.diagonal().sum() / block.shape[0])

    def influence(self, xq: Tensor, yq: Tensor, damping: Mapping[str, float]) -> Tensor:
        """``Σ_ℓ ∇ℓ(q)ᵀ (G_ℓ + λ_ℓ I)⁻¹ ∇ℓ(z)`` for the queries against every training example: ``[Q, N]``."""
        jac, probs = self._jacobians(xq)
        query_grads = self._example_gradients(jac, probs, yq)
        scores = 0
        for name, block in self.blocks.items():
            damped = block + damping[name] * torch.eye(block.shape[0], dtype=block.dtype)
            scores = scores + query_grads[name] @ torch.linalg.solve(damped, self.train_grads[name].T)
        return scores
