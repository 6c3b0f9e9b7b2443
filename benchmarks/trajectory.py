"""Trajectory weighting on the digits LDS: is the weighted trajectory ever worse than the final checkpoint?

For several optimiser settings, an MLP trains 30 epochs on digits with checkpoints every 5 epochs
(the set-up where ``li.aggregate``'s equal-share mean once scored a lower LDS than the final
checkpoint alone). Each checkpoint is scored with post-hoc EK-FAC (true Fisher); the six results are
combined with each ``li.aggregate`` weighting and compared with the final checkpoint by the linear
datamodeling score (ground truth: retraining on random half-subsets, several seeds), with paired
bootstrap intervals over queries.

    python benchmarks/trajectory.py [--quick | --small] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import time
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import TensorDataset

import benchlib
import lightning_influence as li
from lds import lds_per_query

FULL = dict(num_train=1000, num_query=100, hidden=64, epochs=30, every=5, subsets=60, seeds=2)
# --small: the reduced configuration (benchmarks/results/trajectory_500.md).
SMALL = dict(FULL, num_train=500, num_query=60, hidden=32)
QUICK = dict(num_train=120, num_query=12, hidden=16, epochs=6, every=2, subsets=8, seeds=2)
SETTINGS = {
    "SGD lr 0.05, momentum 0.9, wd 1e-3": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "SGD lr 0.3, no momentum": dict(lr=0.3, momentum=0.0, weight_decay=0.0),
    "SGD lr 0.01, momentum 0.9": dict(lr=0.01, momentum=0.9, weight_decay=0.0),
}
WEIGHTINGS = ("mean_abs", "lr", "recency")
BATCH_SIZE = 32


def run_setting(cfg: Dict, optimiser: Dict, data) -> Dict[str, torch.Tensor]:
    """Per-query LDS of the final checkpoint and of each trajectory weighting."""
    (x, y), (xq, yq) = data
    train, query = TensorDataset(x, y), TensorDataset(xq, yq)
    make_model = partial(benchlib.mlp, [64, cfg["hidden"], 10])
    task = li.ClassificationTask()
    n = cfg["num_train"]
    checkpoints: List[Dict[str, torch.Tensor]] = []

    def on_epoch(epoch: int, params: Dict[str, torch.Tensor]) -> None:
        if epoch % cfg["every"] == 0:
            checkpoints.append({k: v.clone() for k, v in params.items()})

    benchlib.train_ensemble(make_model, x, y, torch.arange(n)[None], [0], epochs=cfg["epochs"], on_epoch=on_epoch,
                            batch_size=BATCH_SIZE, **optimiser)
    steps_per_window = cfg["every"] * -(-n // BATCH_SIZE)
    results = []
    for index, params in enumerate(checkpoints):
        model = benchlib.load_member(make_model(), params)
        factors = li.fit_factors(model, task, train, "ekfac", "true")
        result = li.compute_influence(model, task, train, query, factors, batch_size=256)
        result.step = (index + 1) * steps_per_window
        result.meta["window"] = {"lr_sum": optimiser["lr"] * steps_per_window}
        results.append(result)

    gen = torch.Generator().manual_seed(1)
    subsets = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(cfg["subsets"])])
    masks = torch.zeros(cfg["subsets"], n).scatter_(1, subsets, 1.0)
    seeds = [100 + s for s in range(cfg["seeds"])]
    params = benchlib.train_ensemble(make_model, x, y, subsets.repeat_interleave(len(seeds), 0),
                                     seeds * cfg["subsets"], epochs=cfg["epochs"], batch_size=BATCH_SIZE, **optimiser)
    actual = -benchlib.ensemble_losses(make_model, params, xq, yq).view(cfg["subsets"], len(seeds), -1).mean(1)
    per_query = {"final checkpoint": lds_per_query(results[-1].scores, masks, actual)}
    for weighting in WEIGHTINGS:
        per_query[f"trajectory, {weighting}"] = lds_per_query(li.aggregate(results, weighting=weighting).scores,
                                                              masks, actual)
    return per_query


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--small": dict(action="store_true", help="500 training examples, hidden width 32")})
    cfg = QUICK if args.quick else SMALL if args.small else FULL
    started = time.perf_counter()
    data = benchlib.digits(cfg["num_train"], cfg["num_query"])
    rows, diff_rows, payload = [], [], {}
    for name, optimiser in SETTINGS.items():
        per_query = run_setting(cfg, optimiser, data)
        final = per_query["final checkpoint"]
        payload[name] = {}
        for method, values in per_query.items():
            mean, low, high = benchlib.bootstrap_ci(values)
            rows.append([name, method, benchlib.fmt_ci(mean, low, high)])
            payload[name][method] = {"lds": mean, "ci": [low, high]}
            if method != "final checkpoint":
                d_mean, d_low, d_high = benchlib.bootstrap_ci(values - final)
                diff_rows.append([name, method, benchlib.fmt_ci(d_mean, d_low, d_high)])
                payload[name][method]["minus_final"] = {"difference": d_mean, "ci": [d_low, d_high]}
    setup = (f"{cfg['num_train']} digits training examples, {cfg['num_query']} queries, MLP 64-{cfg['hidden']}-10, "
             f"{cfg['epochs']} epochs (batch {BATCH_SIZE}), a checkpoint every {cfg['every']} epochs; post-hoc EK-FAC "
             f"(true Fisher, heuristic damping) at each; ground truth {cfg['subsets']} half-subsets x {cfg['seeds']} "
             "seeds. Weightings: `mean_abs` = equal share per checkpoint; `lr` = raw scores x (learning rate x steps "
             "in the window), TracIn's; `recency` = equal shares doubled from one checkpoint to the next. LDS: mean "
             f"over queries [95% bootstrap interval]. {time.perf_counter() - started:.0f} s.")
    sections = [setup, benchlib.markdown_table(["optimiser", "influence", "LDS"], rows),
                "Paired differences to the final checkpoint (an interval excluding 0 is a real difference):",
                benchlib.markdown_table(["optimiser", "trajectory", "LDS minus final"], diff_rows)]
    benchlib.emit(args, "Trajectory weighting (digits LDS)", sections, {"config": cfg, "settings": payload})
    return payload


if __name__ == "__main__":
    main()
