"""Language-model scale: time and peak memory of every stage on a GPT, as ratios to a forward+backward epoch.

A GPT-style decoder (learned positions, pre-LayerNorm blocks of causal self-attention and a 4x MLP,
untied output head; every ``nn.Linear`` tracked), trained for a few steps on token sequences from a
fixed random bigram chain so that its gradients have the structure of a fitted model. Measured on
one pool of sequences, with 32 queries:

* fitting (``fit_factors``, EK-FAC, empirical Fisher) over the pool;
* query preparation (gradients, preconditioning, truncation) at full rank and rank r, randomised
  (default) and exact, against scoring a 256-sequence pool;
* pairwise scoring of the pool (full rank and rank r), self-influence of the pool;
* the callback's computation at a checkpoint (``InfluenceSession.compute``: eigenvalue correction
  from covariances collected in training, scoring, per-token scores of the top examples);
* kronfluence's ``fit_all_factors`` and ``compute_pairwise_scores`` side by side when importable,
  and full-rank scoring of a larger pool (``--comparison-pool``) by both: the fixed query
  preparation weighs less there, so the ratio tends to that of the pool passes.

Peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the stage; on CPU the
growth of the process's peak resident set (``VmHWM``, reset before each stage), which undercounts
memory the allocator had kept from earlier stages.

    python benchmarks/lm_scale.py [--quick] [--width 512] [--blocks 4] [--tokens 64] [--pool 256]
        [--checkpoint-pool 2048] [--comparison-pool 1024] [--no-kronfluence] [--device cuda]
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset

import benchlib
import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances
from lightning_influence.engine.tracking import select_layers

FULL = dict(width=512, blocks=4, heads=8, vocab=1024, tokens=64, pool=256, queries=32, rank=32, batch_size=16,
            train_steps=30, checkpoint_pool=2048, comparison_pool=1024)
QUICK = dict(width=64, blocks=2, heads=4, vocab=256, tokens=16, pool=64, queries=8, rank=4, batch_size=16,
             train_steps=5, checkpoint_pool=128, comparison_pool=128)


class GPT(nn.Module):
    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["width"])
        self.position = nn.Parameter(0.02 * torch.randn(cfg["tokens"], cfg["width"]))
        self.blocks = nn.ModuleList(benchlib.Block(cfg["width"], cfg["heads"]) for _ in range(cfg["blocks"]))
        self.ln = nn.LayerNorm(cfg["width"])
        self.head = nn.Linear(cfg["width"], cfg["vocab"], bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def bigram_sequences(cfg: Dict[str, Any], count: int, seed: int) -> TensorDataset:
    """Sequences from one fixed random bigram chain (each token has 8 likely successors)."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.randint(cfg["vocab"], (cfg["vocab"], 8), generator=chain)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(count, cfg["tokens"], dtype=torch.long)
    ids[:, 0] = torch.randint(cfg["vocab"], (count,), generator=gen)
    for t in range(1, cfg["tokens"]):
        ids[:, t] = successors[ids[:, t - 1], torch.randint(8, (count,), generator=gen)]
    return TensorDataset(ids)


def trained_model(cfg: Dict[str, Any], device: torch.device) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    data = bigram_sequences(cfg, cfg["train_steps"] * cfg["batch_size"], seed=5).tensors[0].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = li.CausalLMTask()
    for step in range(cfg["train_steps"]):
        batch = (data[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]],)
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, batch).mean().backward()
        optimizer.step()
    return model.eval()


# -- measuring --------------------------------------------------------------------------------------
class Meter:
    """Time and peak memory growth of one stage (CUDA allocator peak, or the process's peak RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> Tuple[Any, float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            before = _rss("VmRSS")
        start = time.perf_counter()
        value = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else _rss("VmHWM")
        return value, seconds, max(0, peak - before)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def forward_backward(model: nn.Module, task: li.Task, data: TensorDataset, batch_size: int,
                     device: torch.device) -> None:
    """A training epoch without the optimizer: the unit every time here is divided by."""
    for start in range(0, len(data), batch_size):
        model.zero_grad(set_to_none=True)
        task.loss(model, (data.tensors[0][start:start + batch_size].to(device),)).sum().backward()
    model.zero_grad(set_to_none=True)


def query_bytes(model: nn.Module, queries: int) -> int:
    """Float32 size of the dense preconditioned queries (the result query preparation keeps)."""
    return 4 * queries * sum(layer.d_out * layer.d_in for layer in select_layers(model))


def _kronfluence_lm_task():
    from kronfluence.task import Task

    class CausalLMKFTask(Task):
        """Token-summed next-token cross-entropy (the empirical Fisher, as ours here)."""

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])[:, :-1].flatten(0, 1)
            targets = batch[0][:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    return CausalLMKFTask()


def kronfluence_rows(model: nn.Module, pool: TensorDataset, queries: TensorDataset, cfg: Dict[str, Any],
                     device: torch.device, meter: Meter, larger_pool: TensorDataset) -> Dict[str, Any]:
    import copy
    import logging
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its torch.cuda.amp use
    task = _kronfluence_lm_task()
    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        wrapped = prepare_model(copy.deepcopy(model).eval(), task)
        analyzer = Analyzer("lm", wrapped, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=tmp)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        _, out["fit_seconds"], out["fit_peak"] = meter(lambda: analyzer.fit_all_factors(
            "factors", pool, per_device_batch_size=cfg["batch_size"], factor_args=factor_args,
            overwrite_output_dir=True))
        for key, rank, train in (("score_None", None, pool), (f"score_{cfg['rank']}", cfg["rank"], pool),
                                 ("score_None_larger_pool", None, larger_pool)):
            args = ScoreArguments(damping_factor=None, query_gradient_low_rank=rank)
            _, seconds, peak = meter(lambda: analyzer.compute_pairwise_scores(
                key, "factors", queries, train, per_device_query_batch_size=len(queries),
                per_device_train_batch_size=cfg["batch_size"], score_args=args, overwrite_output_dir=True))
            out[key] = {"seconds": seconds, "peak": peak, "scores": analyzer.load_pairwise_scores(key)["all_modules"].cpu()}
    return out


CHECKPOINT_DEFAULTS_STAGE = "callback computation at a checkpoint, callback defaults, larger pool"


CHECKPOINT_PARTS = (("factors", "eigendecompositions and correction pass"), ("queries", "query preparation"),
                    ("train", "pool pass"), ("token_scores", "top examples' second pass"))


def checkpoint_parts(stages: Dict[str, Dict[str, float]], name: str, timings: Dict[str, float],
                     epoch: Optional[float] = None) -> None:
    """Rows for the stages of one checkpoint computation (``result.meta["timings"]``)."""
    for key, label in CHECKPOINT_PARTS:
        if key in timings:
            row = {"seconds": timings[key], "peak_bytes": math.nan}
            stages[f"{name}: {label}"] = row if epoch is None else {**row, "epoch_seconds": epoch}


def checkpoint_at_callback_defaults(model, task, queries, cfg, device, meter, stages, stage) -> Tuple[int, float]:
    """The checkpoint computation on a pool of ``checkpoint_pool`` sequences with the callback's own
    defaults (16 correction batches, full-rank queries): its fixed costs (eigendecompositions, query
    preparation) weigh less against a pool of realistic size. Returns the pool size and its epoch."""
    big = bigram_sequences(cfg, cfg["checkpoint_pool"], seed=3)
    bs = cfg["batch_size"]
    _, big_epoch, _ = meter(lambda: forward_backward(model, task, big, bs, device))
    stages[f"forward+backward epoch, pool {len(big)}"] = {"seconds": big_epoch, "peak_bytes": math.nan,
                                                          "epoch_seconds": big_epoch}
    statistics = accumulate_covariances(model, task, big, select_layers(model), fisher="empirical", batch_size=bs,
                                        max_batches=16)
    session = li.InfluenceSession(task, big, queries, curvature=li.CurvatureConfig(fisher="empirical"),
                                  scoring=li.ScoringConfig(batch_size=bs))
    result, _ = stage(CHECKPOINT_DEFAULTS_STAGE, lambda: session.compute(model, statistics, step=1))
    stages[CHECKPOINT_DEFAULTS_STAGE]["epoch_seconds"] = big_epoch
    checkpoint_parts(stages, CHECKPOINT_DEFAULTS_STAGE, result.meta["timings"], big_epoch)
    return len(big), big_epoch


def comparison_stage(cfg: Dict[str, Any]) -> str:
    """The stage name of our full-rank scoring of the ``comparison_pool`` (compared with kronfluence's)."""
    return f"pairwise scoring, full queries, {cfg['comparison_pool']} sequences"


SUMMARY_PARTS = (("eigendecompositions and correction pass", "factors"), ("query preparation", "queries"),
                 ("pool pass", "pool pass"), ("top examples' second pass", "top examples"))


def summary_table(payload: Dict[str, Any]) -> str:
    """The condensed table the documentation shows, from a run's JSON payload: each stage as a ratio to its
    pool's forward+backward epoch, with its parts, peak memory and kronfluence's time over ours.

        python -c "import json, lm_scale; print(lm_scale.summary_table(json.load(open('results/lm_scale.json'))))"
    """
    stages, ratios, epoch, rank = payload["stages"], payload["ratios"], payload["epoch_seconds"], payload["config"]["rank"]
    kron = payload.get("kronfluence") or {}

    def epochs(name: str) -> float:
        return stages[name]["seconds"] / stages[name].get("epoch_seconds", epoch)

    def peak(name: str) -> str:
        peak_bytes = stages[name]["peak_bytes"]
        return "-" if math.isnan(peak_bytes) else f"{peak_bytes / 2**20:,.0f}"

    def parts(name: str) -> str:
        return ", ".join(f"{short} {epochs(f'{name}: {label}'):.2f}" for label, short in SUMMARY_PARTS
                         if f"{name}: {label}" in stages)

    def versus(key: str, name: str) -> str:
        return f"{kron[key]['seconds'] / stages[name]['seconds']:.2f}" if key in kron else "-"

    fit, full, low = "fit_factors (EK-FAC, empirical)", "pairwise scoring, full queries", f"pairwise scoring, rank {rank} queries"
    exact, checkpoint = f"pairwise scoring, rank {rank} exact truncation queries", \
        "callback computation at a checkpoint (InfluenceSession.compute)"
    larger = comparison_stage(payload["config"])
    fit_versus = (f"{kron['fit_seconds'] / stages[fit]['seconds']:.2f} (kronfluence {kron['fit_seconds'] / epoch:.1f} epochs)"
                  if kron else "-")
    full_memory = ratios["scoring peak growth (full) / float32 dense queries"]
    rows = [
        ["`fit_factors` (EK-FAC, empirical)", f"{epochs(fit):.2f} (covariances {epochs('fit_factors: covariances'):.2f}, "
         f"eigendecompositions {epochs('fit_factors: eigendecomposition'):.2f}, correction {epochs('fit_factors: correction'):.2f})",
         peak(fit), fit_versus],
        [f"pairwise scoring, {payload['config']['queries']} full-rank queries (preparation "
         f"{epochs('query preparation, full'):.2f})", f"{epochs(full):.2f}",
         f"{peak(full)} ({full_memory:.2f}x the {payload['dense_query_bytes'] / 2**20:,.0f} MiB of float32 queries)",
         versus("score_None", full)],
        *([[f"the same on a {payload['config']['comparison_pool']:,}-sequence pool", f"{epochs(larger):.2f} of that "
            "pool's epoch", peak(larger), versus("score_None_larger_pool", larger)]] if larger in stages else []),
        [f"pairwise scoring, rank {rank}, randomised truncation (default; preparation "
         f"{epochs(f'query preparation, rank {rank}'):.2f})", f"{epochs(low):.2f}", peak(low), versus(f"score_{rank}", low)],
        [f"pairwise scoring, rank {rank}, `query_truncation=\"exact\"` (preparation "
         f"{epochs(f'query preparation, rank {rank} exact truncation'):.2f})", f"{epochs(exact):.2f}", peak(exact), "-"],
        ["self-influence of the pool", f"{epochs('self-influence'):.2f} ({ratios['self-influence / pairwise (full)']:.2f}x pairwise)",
         peak("self-influence"), "-"],
        [f"callback computation at a checkpoint (`InfluenceSession.compute`, rank {rank})",
         f"{epochs(checkpoint):.2f} ({parts(checkpoint)})", peak(checkpoint), "-"],
        [f"the same on a {payload['config']['checkpoint_pool']:,}-sequence pool at the callback's defaults (full rank, "
         "16 correction batches)", f"{epochs(CHECKPOINT_DEFAULTS_STAGE):.2f} of that pool's epoch "
         f"({parts(CHECKPOINT_DEFAULTS_STAGE)})", peak(CHECKPOINT_DEFAULTS_STAGE), "-"],
    ]
    return benchlib.markdown_table(["stage", "x fwd+bwd epoch", "peak growth MiB", "kronfluence / ours"], rows)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--width": dict(type=int, default=None), "--blocks": dict(type=int, default=None),
        "--tokens": dict(type=int, default=None), "--pool": dict(type=int, default=None),
        "--checkpoint-pool": dict(type=int, default=None,
                                  help="pool of the second checkpoint computation, at the callback's defaults"),
        "--comparison-pool": dict(type=int, default=None,
                                  help="larger pool scored at full rank by us and by kronfluence (with kronfluence only)"),
        "--device": dict(default="cuda" if torch.cuda.is_available() else "cpu"),
        "--no-kronfluence": dict(action="store_true", help="skip the kronfluence rows"),
    })
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("width", args.width), ("blocks", args.blocks), ("tokens", args.tokens),
                                  ("pool", args.pool), ("checkpoint_pool", args.checkpoint_pool),
                                  ("comparison_pool", args.comparison_pool)) if v is not None})
    device, started = torch.device(args.device), time.perf_counter()
    model, task, meter = trained_model(cfg, device), li.CausalLMTask(), Meter(device)
    pool = bigram_sequences(cfg, cfg["pool"], seed=1)
    queries = bigram_sequences(cfg, cfg["queries"], seed=2)
    bs, rank = cfg["batch_size"], cfg["rank"]

    forward_backward(model, task, pool, bs, device)  # warm-up
    # The unit of every ratio: the median of three epochs, so one noisy epoch does not scale them all.
    epochs = sorted(meter(lambda: forward_backward(model, task, pool, bs, device))[1:] for _ in range(3))
    epoch, epoch_peak = epochs[1]
    print(f"forward+backward epoch: {epoch:.1f} s (of {', '.join(f'{e:.1f}' for e, _ in epochs)})",
          file=sys.stderr, flush=True)
    stages: Dict[str, Dict[str, float]] = {}

    def stage(name: str, fn: Callable[[], Any], seconds: Optional[Callable[[Any], float]] = None) -> Any:
        value, wall, peak = meter(fn)
        stages[name] = {"seconds": seconds(value) if seconds else wall, "peak_bytes": peak}
        print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)
        return value

    factors = stage("fit_factors (EK-FAC, empirical)", lambda: li.fit_factors(
        model, task, pool, "ekfac", "empirical", batch_size=bs))
    for part, seconds in factors.meta["timings"].items():
        stages[f"fit_factors: {part}"] = {"seconds": seconds, "peak_bytes": math.nan}
    small_pool = Subset(pool, range(min(256, len(pool))))
    results = {}
    for label, kwargs in (("full", {}), (f"rank {rank}", dict(query_rank=rank)),
                          (f"rank {rank} exact truncation", dict(query_rank=rank, query_truncation="exact"))):
        results[label] = stage(f"pairwise scoring, {label} queries", lambda: li.compute_influence(
            model, task, pool, queries, factors, batch_size=bs, **kwargs))
        stages[f"query preparation, {label}"] = {"seconds": results[label].meta["timings"]["queries"],
                                                 "peak_bytes": math.nan}
    small_stage = "pairwise scoring, full queries" + (", 256 sequences" if len(pool) > 256 else "")
    if len(pool) > 256:
        stage(small_stage, lambda: li.compute_influence(
            model, task, small_pool, queries, factors, batch_size=bs))
    stage("self-influence", lambda: li.compute_self_influence(model, task, pool, factors, batch_size=bs))

    statistics = accumulate_covariances(model, task, pool, select_layers(model), fisher="empirical", batch_size=bs)
    session = li.InfluenceSession(task, pool, queries,
                                  curvature=li.CurvatureConfig(fisher="empirical",
                                                               correction_batches=max(1, len(pool) // (4 * bs))),
                                  scoring=li.ScoringConfig(query_rank=rank, batch_size=bs))
    checkpoint, _ = stage("callback computation at a checkpoint (InfluenceSession.compute)",
                          lambda: session.compute(model, statistics, step=1))
    checkpoint_parts(stages, "callback computation at a checkpoint (InfluenceSession.compute)",
                     checkpoint.meta["timings"])
    big_pool, big_epoch = checkpoint_at_callback_defaults(model, task, queries, cfg, device, meter, stages, stage)

    exact, randomized = results[f"rank {rank} exact truncation"].scores, results[f"rank {rank}"].scores
    truncation_error = float((randomized - exact).abs().max() / exact.abs().max())
    kron = None
    if not args.no_kronfluence and benchlib.kronfluence_available():
        larger_pool = bigram_sequences(cfg, cfg["comparison_pool"], seed=4)
        _, larger_epoch, _ = meter(lambda: forward_backward(model, task, larger_pool, bs, device))
        larger_stage = comparison_stage(cfg)
        larger_result = stage(larger_stage, lambda: li.compute_influence(
            model, task, larger_pool, queries, factors, batch_size=bs))
        stages[larger_stage]["epoch_seconds"] = larger_epoch
        kron = kronfluence_rows(model, pool, queries, cfg, device, meter, larger_pool)

    mib = 2.0 ** 20
    dense_queries = query_bytes(model, cfg["queries"])
    rows = [["forward+backward epoch", epoch, 1.0, epoch_peak / mib, "-"]]
    for name, value in stages.items():
        rows.append([name, value["seconds"], value["seconds"] / value.get("epoch_seconds", epoch),
                     "-" if math.isnan(value["peak_bytes"]) else value["peak_bytes"] / mib, "-"])
    if kron is not None:
        rows.append(["kronfluence fit_all_factors (EK-FAC, empirical)", kron["fit_seconds"],
                     kron["fit_seconds"] / epoch, kron["fit_peak"] / mib,
                     kron["fit_seconds"] / stages["fit_factors (EK-FAC, empirical)"]["seconds"]])
        for label, key, ours, result in (
                ("full", "score_None", "pairwise scoring, full queries", results["full"]),
                (f"rank {rank}", f"score_{rank}", f"pairwise scoring, rank {rank} queries", results[f"rank {rank}"]),
                (f"full, {len(larger_pool)} sequences", "score_None_larger_pool", larger_stage, larger_result)):
            theirs = kron[key]
            pearson = float(benchlib.pearson(theirs["scores"].flatten().double(), result.scores.flatten().double()))
            rows.append([f"kronfluence pairwise scoring, {label} (Pearson with ours {pearson:.4f})",
                         theirs["seconds"], theirs["seconds"] / stages[ours].get("epoch_seconds", epoch),
                         theirs["peak"] / mib, theirs["seconds"] / stages[ours]["seconds"]])
    small_seconds = stages[small_stage]["seconds"]
    ratios = {
        "fit_factors / epoch": stages["fit_factors (EK-FAC, empirical)"]["seconds"] / epoch,
        f"query preparation rank {rank} (randomised, default) / scoring {len(small_pool)}":
            stages[f"query preparation, rank {rank}"]["seconds"] / small_seconds,
        f"query preparation rank {rank} exact truncation / scoring {len(small_pool)}":
            stages[f"query preparation, rank {rank} exact truncation"]["seconds"] / small_seconds,
        f"query preparation full / scoring {len(small_pool)}": stages["query preparation, full"]["seconds"] / small_seconds,
        "self-influence / pairwise (full)": stages["self-influence"]["seconds"]
        / stages["pairwise scoring, full queries"]["seconds"],
        f"checkpoint computation / epoch (pool {len(pool)}, rank {rank})":
            stages["callback computation at a checkpoint (InfluenceSession.compute)"]["seconds"] / epoch,
        f"checkpoint computation / epoch (pool {big_pool}, callback defaults)":
            stages[CHECKPOINT_DEFAULTS_STAGE]["seconds"] / big_epoch,
        "scoring peak growth (full) / float32 dense queries": stages["pairwise scoring, full queries"]["peak_bytes"]
        / dense_queries,
        f"scoring peak growth (rank {rank}) / float32 dense queries":
            stages[f"pairwise scoring, rank {rank} queries"]["peak_bytes"] / dense_queries,
        f"rank-{rank} randomised vs exact truncation: max score difference / max score": truncation_error,
    }
    parameters = sum(p.numel() for p in model.parameters())
    setup = (f"GPT: {cfg['blocks']} blocks, width {cfg['width']}, {cfg['heads']} heads, vocabulary {cfg['vocab']}, "
             f"{cfg['tokens']} tokens ({parameters / 1e6:.1f}M parameters, "
             f"{len(select_layers(model))} tracked layers); pool {cfg['pool']} sequences, {cfg['queries']} queries, "
             f"batch size {bs}; stages on a pool of {cfg['checkpoint_pool']} are ratios to that pool's epoch; device {device}, {args.threads} torch thread(s), torch {torch.__version__}; "
             f"one run each. Float32 size of the {cfg['queries']} dense preconditioned queries: "
             f"{dense_queries / mib:.0f} MiB. Peak memory: growth during the stage "
             f"({'CUDA allocator' if device.type == 'cuda' else 'process peak RSS, reset before each stage'}).")
    sections = [
        setup,
        benchlib.markdown_table(["stage", "seconds", "x fwd+bwd epoch", "peak growth MiB", "kronfluence / ours"],
                                rows),
        benchlib.markdown_table(["target", "measured"], [[k, v] for k, v in ratios.items()]),
    ]
    if kron is None:
        sections.append("kronfluence rows skipped (not installed or `--no-kronfluence`).")
    payload = {"config": cfg, "environment": benchlib.environment(), "device": str(device),
               "epoch_seconds": epoch, "stages": stages, "ratios": ratios, "dense_query_bytes": dense_queries,
               "kronfluence": None if kron is None else {k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                                                         if isinstance(v, dict) else v for k, v in kron.items()},
               "seconds": time.perf_counter() - started}
    # the markers let docs/benchmarks.md include this table from the file (pymdownx.snippets)
    sections.append("Summary (the table of docs/benchmarks.md):\n\n<!-- --8<-- [start:summary] -->\n"
                    + summary_table(payload) + "\n<!-- --8<-- [end:summary] -->")
    benchlib.emit(args, "Language-model scale (GPT)", sections, payload)
    return payload


if __name__ == "__main__":
    main()
