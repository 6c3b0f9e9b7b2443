"""How far covariances collected during training are from the curvature at the weights being scored.

EK-FAC needs two things from the curvature at a checkpoint: an eigenbasis (from the covariances
``A`` and ``S``) and the eigenvalues in it (the correction pass, always fitted at the checkpoint).
Covariances summed while the weights moved describe earlier models; what matters is whether their
eigenbasis still diagonalises the curvature *now*. The staleness of a basis ``Q_A ⊗ Q_S`` against
covariances ``F_A``, ``F_S`` is

    staleness = 1 − d(Q_A, F_A) · d(Q_S, F_S),   d(Q, F) = ‖diag(Qᵀ F Q)‖² / ‖F‖²_F

the fraction of the Kronecker-factored block's energy (``‖F_A ⊗ F_S‖²_F``) off the diagonal in that
basis: 0 when the basis is exact, near 1 for an unrelated one; scale-free (the correction refits
the eigenvalues anyway), two ``d³`` products per factor.

A fresh estimate is noisy too: from a few hundred correction examples even the true basis leaves
energy off the diagonal. So the decision compares like with like. The correction pass gathers
fresh covariances in two halves (alternate batches); a layer is stale when the training basis
describes the second half worse than the basis of the first half does (``staleness >
fresh_staleness``, both against the second half). Then the full fresh covariances' basis is
better still, and the layer gets it. No threshold to tune: with few or noisy fresh examples the
training basis wins ties, with drifting weights the fresh one wins.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from torch import Tensor

REFRESH = ("auto", "always", "never")
# Mean gap between the training basis's and a fresh half's staleness above which statistics used
# without refresh are warned about: the training basis leaves that much more of the curvature off
# its diagonal than a few hundred fresh examples do.
STALE_WARNING_GAP = 0.1


def check_refresh(refresh: str) -> str:
    if refresh not in REFRESH:
        raise ValueError(f"refresh must be one of {REFRESH}, got {refresh!r}")
    return refresh


def diagonal_energy(basis: Tensor, covariance: Tensor) -> float:
    """Fraction of ``covariance``'s squared Frobenius norm on the diagonal in ``basis`` (1 for a zero matrix)."""
    covariance = covariance.double()
    total = covariance.square().sum()
    if total <= 0:
        return 1.0
    basis = basis.to(covariance)
    rotated = basis.T @ covariance @ basis
    return float(rotated.diagonal().square().sum() / total)


def layer_staleness(basis: Mapping[str, Tensor], fresh: Mapping[str, Tensor]) -> float:
    """Staleness of one layer's eigenbasis (``q_a``, ``q_s``) against covariance sums (``a_sum``, ``s_sum``)."""
    kept = diagonal_energy(basis["q_a"], fresh["a_sum"]) * diagonal_energy(basis["q_s"], fresh["s_sum"])
    return min(max(1.0 - kept, 0.0), 1.0)  # round-off never leaves [0, 1]


def measure(training_bases: Mapping[str, Mapping[str, Tensor]], halves: Sequence, fresh) -> Dict[str, Dict[str, float]]:
    """Per layer, against the second half of the fresh covariances (``CovarianceStatistics``; both
    halves together, ``fresh``, when a half saw no example): the ``staleness`` of the training
    basis, and the ``fresh_staleness`` of the first half's basis (``None`` without two halves: a
    single correction example)."""
    first, second = halves
    measurable = all(float(parts["s_count"]) > 0 and float(parts["a_count"]) > 0
                     for half in halves for parts in half.state.values())
    fresh_bases = first.eigendecompose() if measurable else {}
    out = {}
    for name, basis in training_bases.items():
        reference = (second if measurable else fresh).state[name]
        out[name] = {"staleness": layer_staleness(basis, reference),
                     "fresh_staleness": layer_staleness(fresh_bases[name], reference) if measurable else None}
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def stale_layers(measured: Mapping[str, Mapping[str, float]], refresh: str) -> List[str]:
    """The layers to give fresh covariances: every one (``"always"``), none (``"never"``), or those
    whose training basis is staler than a fresh half's (``"auto"``; none when that is unmeasured)."""
    if refresh == "always":
        return list(measured)
    if refresh == "never":
        return []
    return [name for name, m in measured.items()
            if m["fresh_staleness"] is not None and m["staleness"] > m["fresh_staleness"]]


def staleness_report(measured: Mapping[str, Mapping[str, float]], refreshed: Sequence[str],
                     refresh: str) -> Dict[str, object]:
    """What a result records of its curvature's freshness (``meta["curvature"]``): means over layers
    of the training basis's staleness and of a fresh half's (the noise floor), the gap, and the
    refreshed layers (their share is ``refreshed_fraction``)."""
    stale = [m["staleness"] for m in measured.values()]
    floor = [m["fresh_staleness"] for m in measured.values() if m["fresh_staleness"] is not None]
    used = [m["fresh_staleness"] if name in refreshed and m["fresh_staleness"] is not None else m["staleness"]
            for name, m in measured.items()]
    return {
        "staleness": _mean(stale),
        "fresh_staleness": _mean(floor) if len(floor) == len(stale) else None,
        "staleness_used": _mean(used),
        "refreshed_layers": list(refreshed),
        "refreshed_fraction": len(refreshed) / len(measured) if measured else 0.0,
        "per_layer": {name: dict(m) for name, m in measured.items()},
        "refresh": refresh,
    }
