"""Factor memory and traffic per process with curvature sharded across processes (``shard_factors``).

A checkpoint's influence computation (statistics reduction, factors, queries, scores) on W gloo CPU
processes, replicated (every process holds every layer) and sharded (each layer on one owner), for
an MLP whose layers differ in size. Reported per process: bytes of factor tensors held, bytes sent
and received by the reductions and broadcasts (an all-reduce counted as a ring all-reduce moves
them), and the largest score difference between the two.

    python benchmarks/sharding.py [--quick] [--json PATH] [--markdown PATH] [--query-rank R]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import benchlib
import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.engine.collector import StepStatistics
from lightning_influence.checkpoint.session import InfluenceSession

FULL = dict(widths=(64, 256, 512, 256, 512, 128, 10), examples=512, queries=32, worlds=(2, 4))
QUICK = dict(widths=(16, 32, 48, 32, 10), examples=64, queries=8, worlds=(2,))
BATCH = 32


def _model_and_data(cfg):
    torch.manual_seed(0)
    widths = cfg["widths"]
    layers = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["examples"], widths[0], generator=generator)
    y = torch.randint(0, widths[-1], (cfg["examples"],), generator=generator)
    xq = torch.randn(cfg["queries"], widths[0], generator=generator)
    yq = torch.randint(0, widths[-1], (cfg["queries"],), generator=generator)
    return model, TensorDataset(x, y), TensorDataset(xq, yq)


def _worker(rank: int, world: int, out: str, cfg: Dict, query_rank: Optional[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        model, train, queries = _model_and_data(cfg)
        task = li.ClassificationTask()
        statistics = StepStatistics(li.select_layers(model), task, loss_reduction="mean")
        statistics.attach()
        for index, batch in enumerate(DataLoader(train, batch_size=BATCH)):
            if index % world == rank:
                statistics.begin_batch(batch)
                loss = F.cross_entropy(model(batch[0]), batch[1])
                statistics.begin_backward()
                loss.backward()
                statistics.end_batch()
                statistics.commit()
        statistics.detach()
        report = {}
        for shard in (False, True):
            session = InfluenceSession(task, train, queries,
                                       curvature=li.CurvatureConfig(correction_batches=4, shard_factors=shard),
                                       scoring=li.ScoringConfig(batch_size=BATCH, top_k=0, query_rank=query_rank))
            distributed.traffic.update(sent=0, received=0)
            started = time.perf_counter()
            stats = session.reduce_statistics(statistics)
            factors = session.fit_factors(model, stats, step=1, layers=statistics.layers)
            result = session.score(model, factors, step=1)
            report["sharded" if shard else "replicated"] = {
                "factor_bytes": factors.held_bytes(), "layers_held": len(factors.layers),
                "statistics_bytes": sum(t.numel() * t.element_size() for t in stats.tensors()),
                "traffic": dict(distributed.traffic), "seconds": time.perf_counter() - started,
                "scores": result.scores}
        torch.save(report, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{"--query-rank": dict(type=int, default=None)})
    cfg = QUICK if args.quick else FULL
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows, payload = [], {"config": {**cfg, "query_rank": args.query_rank}, "environment": benchlib.environment(),
                         "runs": []}
    mib = 2**20
    for world in cfg["worlds"]:
        with tempfile.TemporaryDirectory() as out:
            torch.multiprocessing.spawn(_worker, args=(world, out, cfg, args.query_rank), nprocs=world, join=True)
            ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
        for rank, report in enumerate(ranks):
            replicated, sharded = report["replicated"], report["sharded"]
            difference = float((sharded["scores"] - replicated["scores"]).abs().max()
                               / replicated["scores"].abs().max())
            rows.append([world, rank, f"{replicated['factor_bytes'] / mib:.2f}",
                         f"{sharded['factor_bytes'] / mib:.2f} ({sharded['layers_held']} layers)",
                         f"{sharded['statistics_bytes'] / mib:.2f} / {replicated['statistics_bytes'] / mib:.2f}",
                         f"{replicated['traffic']['sent'] / mib:.2f} / {replicated['traffic']['received'] / mib:.2f}",
                         f"{sharded['traffic']['sent'] / mib:.2f} / {sharded['traffic']['received'] / mib:.2f}",
                         f"{replicated['seconds']:.2f} / {sharded['seconds']:.2f}", f"{difference:.1e}"])
            payload["runs"].append({"world": world, "rank": rank, **{
                mode: {k: v for k, v in report[mode].items() if k != "scores"} for mode in report},
                "score_difference": difference})
    headers = ["processes", "rank", "factors replicated (MiB)", "factors sharded (MiB)",
               "reduced statistics sharded / replicated (MiB)", "traffic replicated sent / received (MiB)",
               "traffic sharded sent / received (MiB)", "seconds replicated / sharded", "max score diff / max"]
    setup = (f"MLP {'-'.join(map(str, cfg['widths']))} (tanh), {cfg['examples']} training examples, "
             f"{cfg['queries']} queries, query_rank={args.query_rank}, 4 correction batches of {BATCH}; gloo on "
             "CPU. Traffic: the statistics' reduction, the eigenvalue correction's and the preconditioned "
             "queries' exchange (score gathering, the same in both, not counted).")
    benchlib.emit(args, "Sharded curvature: factor memory and traffic per process",
                  [setup, benchlib.markdown_table(headers, rows)], payload)
    return payload


if __name__ == "__main__":
    main()
