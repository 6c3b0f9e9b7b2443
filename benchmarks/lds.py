"""Linear datamodeling score (LDS) on scikit-learn's digits with a small MLP.

Train one model on the whole pool, score every pool example against held-out queries, then
retrain on many random half-subsets (several seeds each, all trained at once as a batched
ensemble) and correlate, per query, the predicted sum of the subset's scores with the measured
query log-likelihood (averaged over seeds). LDS = mean over queries of that Spearman correlation,
with a bootstrap interval over queries; differences between methods use a paired bootstrap.

    python benchmarks/lds.py [--quick] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

import benchlib
import lightning_influence as li

FULL = dict(num_train=1000, num_query=100, hidden=64, epochs=20, checkpoints=4, subsets=100, seeds=3)
QUICK = dict(num_train=160, num_query=16, hidden=16, epochs=4, checkpoints=2, subsets=8, seeds=2)
TRAINING = dict(lr=0.05, batch_size=32, weight_decay=1e-3)


def lds_per_query(scores: Tensor, masks: Tensor, actual: Tensor) -> Tensor:
    """``scores [Q, N]``, subset ``masks [K, N]``, measured log-likelihoods ``actual [K, Q]`` -> ``[Q]``."""
    predicted = scores.double() @ masks.double().T  # [Q, K]: group influence = sum of member scores
    return benchlib.spearman(predicted, actual.T)


def callback_results(make_model, train: TensorDataset, query: TensorDataset, cfg: Dict,
                     **options) -> List[li.InfluenceResult]:
    """Train the same recipe with ``pytorch_lightning`` and ``li.InfluenceCallback`` (its defaults,
    except where noted, and ``options``) computing influence at the checkpoint epochs: the real
    training-time path. The results keep their step, meta and per-step ledger."""
    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=TRAINING["lr"], momentum=0.9,
                                   weight_decay=TRAINING["weight_decay"])

    torch.manual_seed(0)
    module = Module()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        callback = li.InfluenceCallback(task=li.ClassificationTask(), query_data=query, num_queries=len(query),
                                        train_data=train, every_n_epochs=cfg["epochs"] // cfg["checkpoints"],
                                        on_train_end=False, output_dir=tmp,
                                        report=li.ReportConfig(mode="off", log_artifacts=False, show_progress=False),
                                        **{**options, "scoring": {"batch_size": 256, **options.get("scoring", {})}})
        trainer = pl.Trainer(max_epochs=cfg["epochs"], callbacks=[callback], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(module, DataLoader(train, batch_size=TRAINING["batch_size"], shuffle=True,
                                       generator=torch.Generator().manual_seed(0)))
        kept = ("ledger_ids", "ledger_scores")
        return [li.InfluenceResult(scores=r.scores.clone(), train_ids=r.train_ids, query_ids=r.query_ids, step=r.step,
                                   meta=r.meta, **{name: r.get(name).clone() for name in kept if r.get(name) is not None})
                for r in callback.results]


def fractions(curvature: List[Dict]) -> str:
    """The callback's refreshed share of layers at each computation, in words."""
    return ", ".join(f"{c['refreshed_fraction']:.0%} (staleness {c['staleness']:.2f})" for c in curvature)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    (x, y), (xq, yq) = benchlib.digits(cfg["num_train"], cfg["num_query"])
    train, query = TensorDataset(x, y), TensorDataset(xq, yq)
    make_model = partial(benchlib.mlp, [64, cfg["hidden"], 10])
    task = li.ClassificationTask()
    n = cfg["num_train"]

    # The model under study, with checkpoints and the covariances its training steps produced.
    model = make_model()
    collector = benchlib.TrainingTimeCovariances(model, task)
    checkpoint_epochs = [round(cfg["epochs"] * (i + 1) / cfg["checkpoints"]) for i in range(cfg["checkpoints"])]
    checkpoints: List[tuple] = []

    def on_epoch(epoch: int, params: Dict[str, Tensor]) -> None:
        if epoch in checkpoint_epochs:
            checkpoints.append(({k: v.clone() for k, v in params.items()}, collector.take()))

    benchlib.train_ensemble(make_model, x, y, torch.arange(n)[None], [0], epochs=cfg["epochs"],
                            on_step=collector.on_step, on_epoch=on_epoch, **TRAINING)

    # Ground truth: retrain on half-subsets, several seeds each.
    gen = torch.Generator().manual_seed(1)
    subsets = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(cfg["subsets"])])
    masks = torch.zeros(cfg["subsets"], n).scatter_(1, subsets, 1.0)
    seeds = [100 + s for s in range(cfg["seeds"])]
    retrain_start = time.perf_counter()
    params = benchlib.train_ensemble(make_model, x, y, subsets.repeat_interleave(len(seeds), 0),
                                     seeds * cfg["subsets"], epochs=cfg["epochs"], **TRAINING)
    retrain_seconds = time.perf_counter() - retrain_start
    losses = benchlib.ensemble_losses(make_model, params, xq, yq)  # [K*S, Q]
    actual = -losses.view(cfg["subsets"], len(seeds), -1).mean(1)  # log-likelihood, seed-averaged

    def scores_at(params: Dict[str, Tensor], strategy: str, source: str, stats=None) -> li.InfluenceResult:
        model = benchlib.load_member(make_model(), params)
        if strategy == "identity":
            factors = li.fit_factors(model, task, train, "identity")
        elif source == "training":
            factors = li.fit_factors(model, task, train, strategy, "empirical", covariances=stats)
        else:
            factors = li.fit_factors(model, task, train, strategy, source)
        return li.compute_influence(model, task, train, query, factors, batch_size=256)

    final_params, final_stats = checkpoints[-1]
    methods: Dict[str, Tensor] = {}
    for strategy, source in [("identity", "-"), ("diagonal", "true"), ("kfac", "true"), ("kfac", "empirical"),
                             ("kfac", "training"), ("ekfac", "true"), ("ekfac", "empirical"), ("ekfac", "training")]:
        methods[f"{strategy} | {source} | final"] = scores_at(final_params, strategy, source, final_stats).scores
    for strategy, source in [("identity", "-"), ("ekfac", "true"), ("ekfac", "training")]:
        results = [scores_at(p, strategy, source, s) for p, s in checkpoints]
        methods[f"{strategy} | {source} | trajectory ({len(checkpoints)})"] = li.aggregate(results).scores
    refreshes = {}
    for source, curvature in (("callback", {}), ("callback, refresh never", {"refresh": "never"})):
        results = callback_results(make_model, train, query, cfg, curvature=curvature)
        methods[f"ekfac | {source} | final"] = results[-1].scores
        methods[f"ekfac | {source} | trajectory ({len(results)})"] = li.aggregate(results).scores
        refreshes[source] = [{"step": r.step, "staleness": r.meta["curvature"]["staleness"],
                              "refreshed_fraction": r.meta["curvature"]["refreshed_fraction"]} for r in results]
    kron_seconds = None
    if benchlib.kronfluence_available():
        kron_start = time.perf_counter()
        kf = benchlib.Kronfluence(benchlib.load_member(make_model(), final_params), batch_size=256)
        try:
            methods["kronfluence ekfac | true | final"] = kf.scores(kf.fit(train), query, train)
        finally:
            kf.close()
        kron_seconds = time.perf_counter() - kron_start

    per_query = {name: lds_per_query(scores, masks, actual) for name, scores in methods.items()}
    rows, payload_methods = [], {}
    for name, values in per_query.items():
        mean, low, high = benchlib.bootstrap_ci(values)
        strategy, source, when = name.split(" | ")
        rows.append([strategy, source, when, benchlib.fmt_ci(mean, low, high)])
        payload_methods[name] = {"lds": mean, "ci": [low, high], "per_query": values.tolist()}

    comparisons = [
        ("training-time vs post-hoc (true) EK-FAC", "ekfac | training | final", "ekfac | true | final"),
        ("training-time vs post-hoc (empirical) EK-FAC", "ekfac | training | final", "ekfac | empirical | final"),
        ("trajectory vs single checkpoint EK-FAC",
         f"ekfac | true | trajectory ({len(checkpoints)})", "ekfac | true | final"),
        ("trajectory vs single checkpoint, training-time EK-FAC",
         f"ekfac | training | trajectory ({len(checkpoints)})", "ekfac | training | final"),
        ("callback vs post-hoc (true) EK-FAC", "ekfac | callback | final", "ekfac | true | final"),
        ("callback trajectory vs callback single checkpoint",
         f"ekfac | callback | trajectory ({len(checkpoints)})", "ekfac | callback | final"),
        ("callback (default refresh) vs statistics as collected", "ekfac | callback | final",
         "ekfac | callback, refresh never | final"),
        ("ours vs kronfluence EK-FAC", "ekfac | true | final", "kronfluence ekfac | true | final"),
    ]
    diff_rows, payload_diffs = [], {}
    for label, a, b in comparisons:
        if a in per_query and b in per_query:
            mean, low, high = benchlib.bootstrap_ci(per_query[a] - per_query[b])
            diff_rows.append([label, benchlib.fmt_ci(mean, low, high)])
            payload_diffs[label] = {"difference": mean, "ci": [low, high]}

    setup = (f"{n} training examples, {cfg['num_query']} queries, MLP 64-{cfg['hidden']}-10 (tanh), "
             f"{cfg['epochs']} epochs of SGD; {cfg['subsets']} half-subsets x {cfg['seeds']} seeds retrained "
             f"in {retrain_seconds:.1f} s; heuristic damping (0.1 x mean eigenvalue) everywhere; "
             "measurement: query log-likelihood. Source: `true`/`empirical` = post-hoc `fit_factors` "
             "with that Fisher; `training` = covariances from the training steps since the previous "
             "checkpoint (empirical Fisher), eigenvalue correction post-hoc, emulated with the core; `callback` = "
             "the same recipe trained by `pytorch_lightning` with `li.InfluenceCallback` (defaults: empirical "
             "Fisher, statistics reset at each computation, a 16-batch correction pass, `curvature.refresh=\"auto\"`: "
             f"layers refreshed per computation {fractions(refreshes['callback'])}; `refresh never` = the statistics "
             "as collected) scoring at the "
             "checkpoint epochs (a different run of the recipe: its own batch order). Trajectory = `li.aggregate` "
             "over evenly spaced checkpoints. LDS: mean over queries [95% bootstrap interval].")
    sections = [setup,
                benchlib.markdown_table(["strategy", "factors", "checkpoints", "LDS"], rows),
                "Paired differences (bootstrap over queries; an interval excluding 0 is a real difference):",
                benchlib.markdown_table(["comparison", "LDS difference"], diff_rows)]
    if kron_seconds is None:
        sections.append("kronfluence is not installed: its row was skipped.")
    payload = {"config": cfg, "training": TRAINING, "environment": benchlib.environment(),
               "methods": payload_methods, "differences": payload_diffs, "callback_curvature": refreshes,
               "seconds": {"total": time.perf_counter() - started, "retraining": retrain_seconds,
                           "kronfluence": kron_seconds}}
    benchlib.emit(args, "Linear datamodeling score (digits MLP)", sections, payload)
    return payload


if __name__ == "__main__":
    main()
