"""Fitting: a strategy's :class:`~lightning_influence.engine.factors.Factors` from data, running the
passes its :class:`~lightning_influence.engine.approximations.CurvatureApproximation` needs."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_influence.engine import passes
from lightning_influence.engine.approximations import CurvatureApproximation, approximation
from lightning_influence.engine.curvature_passes import (
    _warn_left_out,
    accumulate_covariances,
    accumulate_eigenvalue_correction,
    curvature_at_checkpoint,
)
from lightning_influence.engine.factors import Factors, check_fisher
from lightning_influence.engine.statistics import CovarianceStatistics, EigenvalueCorrection, stored_bases
from lightning_influence.engine.tracking import TrackedLayer, layers_by_name, select_layers


def factors_from_statistics(strategy: Union[str, CurvatureApproximation], layers: Sequence[TrackedLayer],
                            bases: Optional[Mapping[str, Mapping[str, Tensor]]],
                            correction: Optional[EigenvalueCorrection],
                            meta: Optional[Dict[str, Any]] = None) -> Factors:
    """Assemble a strategy's ``Factors`` from the eigenbases of the covariances (K-FAC, EK-FAC)
    and the accumulated squared gradients (EK-FAC, diagonal)."""
    kind = approximation(strategy)
    per_layer: Dict[str, Dict[str, Tensor]] = {}
    for layer in layers:
        basis = bases[layer.name] if kind.needs_covariances else None
        corrected = correction.mean(layer.name) if kind.needs_correction_pass else None
        per_layer[layer.name] = kind.layer_factors(layer, basis, corrected)
    return Factors(kind, per_layer, meta)


@passes.outside_inference_mode
def fit_factors(model, task, data, strategy: str = "ekfac", fisher: str = "true", *,
                layers: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
                batch_size: int = 32, num_samples: int = 1, max_batches: Optional[int] = None,
                seed: int = 0, covariances: Optional[CovarianceStatistics] = None,
                max_layer_bytes: Optional[int] = None, memory_budget_bytes: Optional[int] = None,
                dtype: torch.dtype = torch.float32, show_progress: bool = False,
                reduce: Optional[Callable[[List[Tensor]], None]] = None,
                statistics_device: Union[None, str, torch.device] = None,
                eigenbasis_dtype: torch.dtype = torch.float64,
                refresh: str = "never") -> Factors:
    """Fit the curvature approximation of ``model`` on ``data``.

    Args:
        model: any ``nn.Module`` (its train/eval flags and buffers are restored afterwards).
        task: a :class:`~lightning_influence.tasks.Task` giving per-example losses.
        data: a map-style Dataset or a DataLoader.
        strategy: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"``, ``"identity"``, or the name of
            an approximation registered with :func:`~lightning_influence.engine.approximations.register_approximation`.
        fisher: ``"true"`` (targets sampled from the model, as in the paper), ``"empirical"``
            (the data's own targets) or ``"exact"`` (Gauss-Newton without sampling noise; one
            backward per output dimension, for small models and tests).
        layers: module names or glob patterns to track (default: every trackable layer).
        exclude: names or patterns to leave out.
        batch_size: batch size when ``data`` is a Dataset.
        num_samples: sampled targets per example for ``fisher="true"``.
        max_batches: use only the first batches of ``data`` (bounded fitting).
        seed: seed of the private generator used for sampled targets.
        covariances: statistics already accumulated (e.g. during training); skips that pass.
        max_layer_bytes: skip (with a warning) layers whose statistics exceed this.
        memory_budget_bytes: refuse a configuration whose statistics exceed this.
        dtype: accumulation dtype of the statistics (float32; float64 for exactness checks).
        show_progress: show progress bars.
        reduce: called in place on the sums this call accumulates (e.g. an all-reduce across
            processes, each of which passed its own share of ``data``) before they are used.
        statistics_device: where the covariance sums are accumulated and decomposed (e.g.
            ``"cpu"``: off the GPU, which then holds one layer's ``d x d`` product at a time);
            default: the model's device. The bases are moved to the model's device afterwards.
        eigenbasis_dtype: dtype the eigenbases are kept in (float64 default; float32 or bfloat16
            halve or quarter the factors' memory: see the README for the accuracy cost).
        refresh: with ``covariances`` (K-FAC / EK-FAC, e.g. collected while the weights moved):
            ``"auto"`` refits from ``data``'s covariances the eigenbasis of each layer where they
            describe the current weights better (:mod:`~lightning_influence.engine.freshness`), ``"always"``
            every layer's, ``"never"`` none (EK-FAC still measures their staleness);
            ``meta["curvature"]`` records it.

    Returns:
        :class:`Factors`, to pass to ``compute_influence`` or ``save``. Examples with non-finite
        values (NaN/inf, or squares overflowing ``dtype``) are left out of the statistics, reported
        in a warning, and counted in ``meta["nonfinite_examples"]``; ``meta["timings"]`` holds the
        seconds of each stage (covariances, eigendecomposition, correction).
    """
    kind = approximation(strategy)
    check_fisher(fisher)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if covariances is not None:
        chosen = layers_by_name(model, list(covariances.state))
    else:
        chosen = select_layers(model, layers, exclude, max_layer_bytes, memory_budget_bytes)
    left_out: List[int] = []
    kwargs = dict(fisher=fisher, num_samples=num_samples, batch_size=batch_size, max_batches=max_batches,
                  dtype=dtype, show_progress=show_progress, left_out=left_out)
    timings: Dict[str, float] = {}
    bases, correction, curvature = None, None, {}
    started = time.perf_counter()
    if kind.needs_covariances and covariances is not None:  # collected elsewhere: maybe stale
        bases, correction, curvature = curvature_at_checkpoint(
            model, task, [(data, seed + 1)], chosen, covariances, strategy=kind, refresh=refresh,
            eigenbasis_dtype=eigenbasis_dtype, reduce=reduce, **kwargs)
        timings["correction"] = time.perf_counter() - started
    elif kind.needs_covariances:
        into = CovarianceStatistics(chosen, dtype, statistics_device) if statistics_device is not None else None
        covariances = accumulate_covariances(model, task, data, chosen, seed=seed, into=into, **kwargs)
        if reduce is not None:
            reduce(covariances.tensors())
        timings["covariances"] = time.perf_counter() - started
        started = time.perf_counter()
        bases = stored_bases(covariances.eigendecompose(), eigenbasis_dtype, passes.model_device(model))
        timings["eigendecomposition"] = time.perf_counter() - started
    if kind.needs_correction_pass and correction is None:  # in the eigenbasis, if there is one
        started = time.perf_counter()
        correction = accumulate_eigenvalue_correction(model, task, data, chosen, bases,
                                                      seed=seed + 1, **kwargs)
        if reduce is not None:
            reduce(correction.tensors())
        timings["correction"] = time.perf_counter() - started
    _warn_left_out(left_out)
    meta = {"fisher": fisher, "num_samples": num_samples, "layers": [l.name for l in chosen],
            "nonfinite_examples": len(set(left_out)), "timings": timings}
    if covariances is not None:
        meta["tokens_seen"] = curvature.pop("tokens_seen", None) or {
            n: float(p["a_count"]) for n, p in covariances.state.items()}
    if curvature:
        meta["curvature"] = curvature
    return factors_from_statistics(kind, chosen, bases, correction, meta)
