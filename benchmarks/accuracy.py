"""Accuracy of each strategy against the exact damped Gauss-Newton influence (digits MLP).

Every strategy and factor source is scored with the same per-layer damping λ_ℓ = c × (mean
eigenvalue of the exact Gauss-Newton block ℓ) as the dense oracle, for several c; the table gives
the Pearson and Spearman correlation with the oracle (per query, averaged over queries) and the
relative Frobenius error of the curvature blocks themselves.

    python benchmarks/accuracy.py [--quick] [--json PATH] [--markdown PATH] [--eigenbasis-dtype bfloat16]

``--eigenbasis-dtype`` stores the K-FAC / EK-FAC eigenbases of every post-hoc fit in that dtype
(the memory lever ``eigenbasis_dtype``), to compare its table with the float64 default's.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Dict, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

import benchlib
import lightning_influence as li
from lightning_influence.engine.oracle import factor_block
from oracle import DenseGaussNewton

FULL = dict(num_train=500, num_query=50, hidden=32, epochs=20, dampings=(0.01, 0.1, 1.0))
QUICK = dict(num_train=80, num_query=8, hidden=8, epochs=3, dampings=(0.1,))
TRAINING = dict(lr=0.05, batch_size=32, weight_decay=1e-3)
# (strategy, factor source): post-hoc fit_factors with that Fisher, or covariances from training.
METHODS = [("identity", "-"), ("diagonal", "true"), ("diagonal", "empirical"),
           ("kfac", "exact"), ("kfac", "true"), ("kfac", "empirical"), ("kfac", "training"),
           ("ekfac", "exact"), ("ekfac", "true"), ("ekfac", "empirical"), ("ekfac", "training"),
           ("ekfac", "training, lagged basis")]


def block_error(factors: li.Factors, oracle: DenseGaussNewton) -> Optional[float]:
    """Relative Frobenius error of the strategy's curvature blocks (all layers together)."""
    if factors.strategy == "identity":
        return None
    num = sum(float((factor_block(factors, n).double() - g).square().sum()) for n, g in oracle.blocks.items())
    den = sum(float(g.square().sum()) for g in oracle.blocks.values())
    return (num / den) ** 0.5


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{"--eigenbasis-dtype": dict(
        default="float64", choices=("float64", "float32", "bfloat16"), help="dtype the eigenbases are stored in")})
    bases = dict(eigenbasis_dtype=getattr(torch, args.eigenbasis_dtype))
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    (x, y), (xq, yq) = benchlib.digits(cfg["num_train"], cfg["num_query"])
    train, query = TensorDataset(x, y), TensorDataset(xq, yq)
    task = li.ClassificationTask()
    make_model = partial(benchlib.mlp, [64, cfg["hidden"], 10])
    model = make_model()
    collector = benchlib.TrainingTimeCovariances(model, task)
    last_epoch = {}

    def on_epoch(epoch, params):  # the callback's view: statistics of the last epoch's steps
        if epoch == cfg["epochs"] - 2:
            collector.take()
        if epoch == cfg["epochs"] - 1:  # the lagged alternative: correct in the previous window's basis
            collector.start_lagged_correction(collector.take().eigendecompose())
        last_epoch["stats"] = collector.stats

    params = benchlib.train_ensemble(make_model, x, y, torch.arange(len(x))[None], [0], epochs=cfg["epochs"],
                                     on_step=collector.on_step, on_epoch=on_epoch, **TRAINING)
    benchlib.load_member(model, params)

    oracle = DenseGaussNewton(model, [layer.name for layer in collector.layers], x, y)
    oracle_seconds = time.perf_counter() - started
    scale = {name: oracle.mean_eigenvalue(name) for name in oracle.blocks}
    truth = {c: oracle.influence(xq, yq, {n: c * s for n, s in scale.items()}) for c in cfg["dampings"]}

    rows, payload_rows = [], []
    for strategy, source in METHODS:
        if strategy == "identity":
            factors = li.fit_factors(model, task, train, "identity")
        elif source == "training":
            factors = li.fit_factors(model, task, train, strategy, "empirical", covariances=last_epoch["stats"],
                                     **bases)
        elif source == "training, lagged basis":
            factors = collector.lagged_factors()
        else:
            factors = li.fit_factors(model, task, train, strategy, source, batch_size=64, **bases)
        row = [strategy, source]
        entry = {"strategy": strategy, "factors": source, "correlations": {}}
        for c, exact in truth.items():
            damping = {n: c * s for n, s in scale.items()}
            scores = li.compute_influence(model, task, train, query, factors, damping, batch_size=256).scores
            r, rho = benchlib.pearson(scores, exact).mean(), benchlib.spearman(scores, exact).mean()
            row.append(f"{float(r):.3f} / {float(rho):.3f}")
            entry["correlations"][str(c)] = {"pearson": float(r), "spearman": float(rho)}
        error = block_error(factors, oracle)
        row.append("-" if error is None else f"{error:.3f}")
        entry["block_error"] = error
        rows.append(row)
        payload_rows.append(entry)

    headers = ["strategy", "factors"] + [f"λ = {c} × mean eig: Pearson / Spearman" for c in cfg["dampings"]]
    headers.append("block error ‖B − G‖/‖G‖")
    setup = (f"MLP 64-{cfg['hidden']}-10 (tanh) trained {cfg['epochs']} epochs on {len(x)} digits; "
             f"{len(xq)} held-out queries. Ground truth: exact block-diagonal Gauss-Newton influence "
             "(`benchmarks/oracle.py`) with the same per-layer λ. Factors: post-hoc `fit_factors` with the "
             "`exact`, `true` (one sampled target) or `empirical` Fisher, or `training` = covariances from "
             "the last epoch's training steps (what the callback collects) with a post-hoc empirical "
             "eigenvalue correction (the callback's bounded pass), or `training, lagged basis` = the "
             "alternative the callback did not take: eigenbasis from the previous epoch's statistics and "
             "eigenvalues accumulated from the last epoch's training steps in that basis. Correlations per "
             "query, averaged.")
    setup += f" Eigenbases stored in {args.eigenbasis_dtype} (lagged-basis row: float64)."
    payload = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "eigenbasis_dtype": args.eigenbasis_dtype,
               "environment": benchlib.environment(), "rows": payload_rows,
               "seconds": {"total": time.perf_counter() - started, "oracle": oracle_seconds}}
    benchlib.emit(args, "Accuracy against the exact damped Gauss-Newton influence", [setup,
                  benchlib.markdown_table(headers, rows)], payload)
    return payload


if __name__ == "__main__":
    main()
