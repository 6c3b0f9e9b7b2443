"""Scoring throughput, factor-fitting time and scoring memory, against forward+backward and kronfluence.

All on one model (a 4-layer, 512-wide MLP on synthetic 10-class data) in one run, so that every
number is a ratio to something measured alongside it on the same machine:

* scoring throughput (pool examples per second, query gradients included) for 1, 32 and 256
  queries, full-rank and rank-32 queries, over plain forward+backward throughput of the same model
  and batches, and over kronfluence's ``compute_pairwise_scores`` on the same queries and pool;
* factor fitting (covariances, eigendecomposition, eigenvalue correction) against kronfluence's
  ``fit_all_factors``, and against one forward+backward epoch;
* peak memory while scoring pools of 1x and 10x the size, each in a fresh process, next to the
  size of the score matrix itself.

    python benchmarks/speed.py [--quick] [--json PATH] [--markdown PATH] [--no-kronfluence]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

import benchlib
import lightning_influence as li

FULL = dict(width=512, depth=4, classes=10, fit_examples=4096, pool=2048, queries=(1, 32, 256), rank=32,
            batch_size=256, memory_pool=4096, memory_queries=32, repeats=2)
QUICK = dict(width=32, depth=4, classes=10, fit_examples=256, pool=256, queries=(1, 8), rank=4,
             batch_size=64, memory_pool=256, memory_queries=4, repeats=1)


def make_model(cfg: Dict) -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [cfg["width"]] * cfg["depth"] + [cfg["classes"]]
    return benchlib.mlp(widths, torch.nn.ReLU)


def make_data(cfg: Dict, num: int, seed: int) -> TensorDataset:
    """Inputs with a few strong directions and labels from a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, cfg["width"], generator=gen)
    teacher = torch.randn(cfg["width"], cfg["classes"], generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x @ teacher).argmax(-1))


def forward_backward(model: torch.nn.Module, task: li.Task, data: TensorDataset, batch_size: int) -> None:
    """One training-like epoch without the optimizer: the baseline every throughput is compared to."""
    for batch in DataLoader(data, batch_size=batch_size):
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).sum().backward()


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(cfg: Dict, pool: int, factors_path: str) -> Dict:
    """Run in a fresh process: peak RSS growth while scoring ``pool`` examples (data, model and
    factors already in memory, the code paths warmed up on a small pool, the peak reset)."""
    model, task = make_model(cfg), li.ClassificationTask()
    data, query = make_data(cfg, pool, seed=1), make_data(cfg, cfg["memory_queries"], seed=2)
    factors = li.load_factors(factors_path)
    kwargs = dict(query_rank=cfg["rank"], batch_size=cfg["batch_size"])
    subset = torch.utils.data.Subset
    li.compute_influence(model, task, subset(data, range(cfg["batch_size"])), subset(query, [0]), factors, **kwargs)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = current_rss()
    result = li.compute_influence(model, task, data, query, factors, **kwargs)
    return {"pool": pool, "peak_growth_bytes": peak_rss() - before, "peak_reset": reset,
            "score_bytes": result.scores.numel() * result.scores.element_size(),
            "data_bytes": data.tensors[0].numel() * 4}


def run_probe(cfg_name: str, pool: int, factors_path: str, threads: int) -> Dict:
    command = [sys.executable, __file__, "--probe-memory", str(pool), "--factors", factors_path,
               "--threads", str(threads)] + (["--quick"] if cfg_name == "quick" else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--no-kronfluence": dict(action="store_true", help="skip the kronfluence rows"),
        "--probe-memory": dict(type=int, default=None, help="(internal) memory probe pool size"),
        "--factors": dict(default=None, help="(internal) factors directory for the memory probe"),
    })
    cfg = QUICK if args.quick else FULL
    if args.probe_memory is not None:
        print(json.dumps(memory_probe(cfg, args.probe_memory, args.factors)))
        return {}
    started = time.perf_counter()
    model, task = make_model(cfg), li.ClassificationTask()
    fit_data, pool = make_data(cfg, cfg["fit_examples"], seed=0), make_data(cfg, cfg["pool"], seed=1)
    bs, repeats = cfg["batch_size"], cfg["repeats"]
    use_kron = not args.no_kronfluence and benchlib.kronfluence_available()
    kron = benchlib.Kronfluence(model, batch_size=bs) if use_kron else None

    # Baselines: forward+backward epochs over the pool and over the fitting data.
    fb_pool = benchlib.best_time(lambda: forward_backward(model, task, pool, bs), repeats)
    fb_fit = benchlib.best_time(lambda: forward_backward(model, task, fit_data, bs), repeats)

    # Factor fitting.
    fitted = {}
    fit_seconds = benchlib.best_time(
        lambda: fitted.update(f=li.fit_factors(model, task, fit_data, "ekfac", "true", batch_size=bs)), repeats)
    factors = fitted["f"]
    kron_fit_seconds = None
    if kron is not None:
        start = time.perf_counter()
        kron_factors = kron.fit(fit_data)
        kron_fit_seconds = time.perf_counter() - start
    fit_rows = [["lightning-influence `fit_factors` (EK-FAC, true Fisher)", fit_seconds, fit_seconds / fb_fit,
                 "-" if kron_fit_seconds is None else kron_fit_seconds / fit_seconds]]
    if kron_fit_seconds is not None:
        fit_rows.append(["kronfluence `fit_all_factors` (EK-FAC)", kron_fit_seconds, kron_fit_seconds / fb_fit, 1.0])

    # Scoring throughput: streaming rate (pool / time spent on pool batches) and whole-call rate
    # (query gradients, preconditioning and truncation included: a one-off cost per query set).
    score_rows: List[list] = []
    throughput = {}
    fb_rate = cfg["pool"] / fb_pool
    for num_queries in cfg["queries"]:
        queries = make_data(cfg, num_queries, seed=2)
        for rank in (None, cfg["rank"]):
            timings = li.compute_influence(model, task, pool, queries, factors, query_rank=rank,
                                           batch_size=bs).meta["timings"]
            streaming = cfg["pool"] / timings["train"]
            whole = cfg["pool"] / (timings["train"] + timings["queries"])
            theirs = None
            if kron is not None:
                start = time.perf_counter()
                kron.scores(kron_factors, queries, pool, rank=rank)
                theirs = cfg["pool"] / (time.perf_counter() - start)
            label = "full" if rank is None else f"rank {rank}"
            throughput[f"{num_queries}/{label}"] = {"streaming": streaming, "whole_call": whole,
                                                   "query_seconds": timings["queries"], "kronfluence": theirs}
            score_rows.append([num_queries, label, round(streaming), streaming / fb_rate, timings["queries"],
                               whole / fb_rate, "-" if theirs is None else theirs / fb_rate,
                               "-" if theirs is None else whole / theirs])
    if kron is not None:
        kron.close()

    # Memory: pools of 1x and 10x, each in a fresh process.
    with tempfile.TemporaryDirectory() as tmp:
        factors.save(f"{tmp}/factors")
        probes = [run_probe("quick" if args.quick else "full", n, f"{tmp}/factors", args.threads)
                  for n in (cfg["memory_pool"], 10 * cfg["memory_pool"])]
    mib = 2.0 ** 20
    memory_rows = [[p["pool"], p["data_bytes"] / mib, p["score_bytes"] / mib, p["peak_growth_bytes"] / mib,
                    (p["peak_growth_bytes"] - p["score_bytes"]) / mib] for p in probes]

    setup = (f"MLP {'-'.join([str(cfg['width'])] * cfg['depth'] + [str(cfg['classes'])])} (ReLU), synthetic "
             f"10-class data, batch size {bs}, {args.threads} torch thread(s); baselines and our factor fitting: best "
             f"of {repeats}, everything else one run. Forward+backward (parameter gradients of the summed loss): "
             f"{fb_rate:.0f} examples/s. EK-FAC factors (true Fisher), heuristic damping. Streaming = pool "
             "examples / time spent on pool batches (the rate that scales with the pool); query preparation = "
             "query gradients, preconditioning (float64) and rank-r truncation, paid once per query set; "
             f"whole call = one `compute_influence` on {cfg['pool']} pool examples. kronfluence: "
             "`compute_pairwise_scores` (its defaults: float32, randomised `svd_lowrank`) on the same queries, "
             "pool and batch size.")
    sections = [
        setup,
        "### Scoring throughput",
        benchlib.markdown_table(["queries", "query gradients", "streaming examples/s", "streaming x fwd+bwd",
                                 "query preparation s", f"whole call x fwd+bwd ({cfg['pool']} pool)",
                                 "kronfluence whole call x fwd+bwd", "whole call vs kronfluence"], score_rows),
        f"### Factor fitting ({cfg['fit_examples']} examples; one forward+backward epoch: {fb_fit:.2f} s)",
        benchlib.markdown_table(["", "seconds", "x fwd+bwd epoch", "kronfluence / this"], fit_rows),
        f"### Peak memory while scoring ({cfg['memory_queries']} rank-{cfg['rank']} queries, fresh process each)",
        benchlib.markdown_table(["pool", "pool data MiB", "score matrix MiB", "peak growth MiB",
                                 "peak growth − score matrix MiB"], memory_rows),
    ]
    if kron is None:
        sections.append("kronfluence rows skipped (not installed or `--no-kronfluence`).")
    payload = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "environment": benchlib.environment(), "threads": args.threads,
               "forward_backward": {"pool_seconds": fb_pool, "fit_seconds": fb_fit, "examples_per_s": fb_rate},
               "fit": {"ours_seconds": fit_seconds, "kronfluence_seconds": kron_fit_seconds},
               "throughput": throughput, "memory": probes, "seconds": time.perf_counter() - started}
    benchlib.emit(args, "Speed and memory (4-layer MLP)", sections, payload)
    return payload


if __name__ == "__main__":
    main()
