"""The per-step influence ledger on the digits LDS: ledger vs single checkpoint vs checkpoint trajectory.

One MLP trains on digits with ``pytorch_lightning`` and ``li.InfluenceCallback`` (``scoring.ledger=32``),
computing influence at evenly spaced epochs. From the same run: the final checkpoint's scores, the
trajectory (``li.aggregate`` over the checkpoints, equal shares and learning-rate weighting) and the
ledger (the windows' per-step sums added up over training: TracIn with the curvature of the latest
computation, examples never collected score 0). Once with the callback's default
``curvature.collect_every_n_steps`` and once collecting every step. Ground truth: retraining the recipe on
random half-subsets (several seeds); LDS and paired bootstrap intervals over queries as in ``lds.py``.

    python benchmarks/ledger_lds.py [--quick | --small] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import time
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

import benchlib
import lightning_influence as li
from lds import TRAINING, callback_results, lds_per_query

FULL = dict(num_train=1000, num_query=100, hidden=64, epochs=20, checkpoints=4, subsets=100, seeds=3)  # lds.py's
SMALL = dict(num_train=500, num_query=60, hidden=32, epochs=20, checkpoints=4, subsets=60, seeds=2)
LEDGER_DIRECTIONS = 32  # scoring.ledger: the shared subspace's directions per layer and side
QUICK = dict(num_train=120, num_query=12, hidden=16, epochs=4, checkpoints=2, subsets=8, seeds=2)


def ledger_total(results: List[li.InfluenceResult], num_train: int) -> Tensor:
    """``[Q, N]``: every window's ledger added up, per training index (0 where never collected)."""
    total = torch.zeros(results[0].num_queries, num_train, dtype=torch.float64)
    for result in results:
        ids, scores = result.get("ledger_ids"), result.get("ledger_scores")
        if ids is not None:
            total.index_add_(1, ids, scores.double())
    return total


def coverage(results: List[li.InfluenceResult], num_train: int) -> float:
    """Share of the training examples the ledger saw at least once."""
    seen = torch.zeros(num_train, dtype=torch.bool)
    for result in results:
        if result.get("ledger_ids") is not None:
            seen[result.get("ledger_ids")] = True
    return float(seen.float().mean())


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--small": dict(action="store_true", help="500 training examples, hidden width 32")})
    cfg = QUICK if args.quick else SMALL if args.small else FULL
    started = time.perf_counter()
    (x, y), (xq, yq) = benchlib.digits(cfg["num_train"], cfg["num_query"])
    train, query = TensorDataset(x, y), TensorDataset(xq, yq)
    make_model = partial(benchlib.mlp, [64, cfg["hidden"], 10])
    n = cfg["num_train"]
    default_every, subspace = li.CurvatureConfig().collect_every_n_steps, LEDGER_DIRECTIONS

    methods: Dict[str, Tensor] = {}
    covered: Dict[str, float] = {}
    for label, every in ((f"curvature.collect_every_n_steps={default_every} (default)", default_every),
                         ("curvature.collect_every_n_steps=1", 1)):
        results = callback_results(make_model, train, query, cfg, curvature={"collect_every_n_steps": every},
                                   scoring={"ledger": subspace})
        methods[f"final checkpoint | {label}"] = results[-1].scores
        methods[f"trajectory ({len(results)}), mean_abs | {label}"] = li.aggregate(results).scores
        methods[f"trajectory ({len(results)}), lr | {label}"] = li.aggregate(results, weighting="lr").scores
        methods[f"ledger | {label}"] = ledger_total(results, n)
        covered[label] = coverage(results, n)
    # What the ledger's shared query subspace costs: the same recipe with a narrower one (half the
    # per-step cost), a wider one, and none.
    for size in (subspace // 2, 2 * subspace, 0):
        results = callback_results(make_model, train, query, cfg, curvature={"collect_every_n_steps": 1},
                                   scoring={"ledger": size})
        method = f"ledger, scoring.ledger={size}" if size else "ledger, scoring.ledger=0 (rank-16 queries)"
        methods[f"{method} | curvature.collect_every_n_steps=1"] = ledger_total(results, n)

    gen = torch.Generator().manual_seed(1)
    subsets = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(cfg["subsets"])])
    masks = torch.zeros(cfg["subsets"], n).scatter_(1, subsets, 1.0)
    seeds = [100 + s for s in range(cfg["seeds"])]
    params = benchlib.train_ensemble(make_model, x, y, subsets.repeat_interleave(len(seeds), 0),
                                     seeds * cfg["subsets"], epochs=cfg["epochs"], **TRAINING)
    actual = -benchlib.ensemble_losses(make_model, params, xq, yq).view(cfg["subsets"], len(seeds), -1).mean(1)

    per_query = {name: lds_per_query(scores, masks, actual) for name, scores in methods.items()}
    rows, diff_rows, payload = [], [], {}
    for name, values in per_query.items():
        method, setting = name.split(" | ")
        mean, low, high = benchlib.bootstrap_ci(values)
        rows.append([setting, method, benchlib.fmt_ci(mean, low, high)])
        payload[name] = {"lds": mean, "ci": [low, high]}
        final = per_query[f"final checkpoint | {setting}"]
        if not method.startswith("final"):
            d_mean, d_low, d_high = benchlib.bootstrap_ci(values - final)
            diff_rows.append([setting, method, benchlib.fmt_ci(d_mean, d_low, d_high)])
            payload[name]["minus_final"] = {"difference": d_mean, "ci": [d_low, d_high]}
    setup = (f"{n} digits training examples, {cfg['num_query']} queries, MLP 64-{cfg['hidden']}-10 (tanh), "
             f"{cfg['epochs']} epochs of SGD (lr {TRAINING['lr']}, momentum 0.9, batch {TRAINING['batch_size']}) "
             f"trained by `pytorch_lightning` with `li.InfluenceCallback(scoring={{'ledger': {subspace}}})` "
             "(otherwise its defaults: "
             f"empirical Fisher, EK-FAC) computing at {cfg['checkpoints']} evenly spaced epochs; ground truth "
             f"{cfg['subsets']} half-subsets x {cfg['seeds']} seeds. Ledger = all windows' ledgers added up "
             "(first window: plain gradients, TracIn), its queries projected onto a shared "
             f"{subspace}-direction subspace per layer and side (chosen in the curvature's metric) unless noted; "
             "share of training examples it saw: "
             + ", ".join(f"{100 * v:.0f}% with {k}" for k, v in covered.items())
             + f". LDS: mean over queries [95% bootstrap interval]. {time.perf_counter() - started:.0f} s.")
    sections = [setup, benchlib.markdown_table(["collection", "influence", "LDS"], rows),
                "Paired differences to the final checkpoint of the same run (an interval excluding 0 is a real "
                "difference):", benchlib.markdown_table(["collection", "influence", "LDS minus final"], diff_rows)]
    benchlib.emit(args, "Per-step ledger vs checkpoints (digits LDS)", sections,
                  {"config": cfg, "coverage": covered, "methods": payload})
    return payload


if __name__ == "__main__":
    main()
