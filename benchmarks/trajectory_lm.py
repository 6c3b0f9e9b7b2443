"""Trajectory vs final checkpoint on the arithmetic language model, checked against planted near-duplicates.

Ground truth by construction: for every held-out query problem (``examples/arithmetic_lm.py``'s
templates, measurement = log-probability of the answer), ``copies`` near-duplicates are planted in
the training corpus: the same template, operands and answer under another name and object. Every
training problem with the query's template and operands (planted or occurring naturally) is
*relevant*: training on it teaches exactly the query's answer (checked causally: retraining without
the relevant problems lowers the queries' answer log-probability). A tiny GPT trains with
``pytorch_lightning`` and ``li.InfluenceCallback`` (also ``scoring.ledger=32``), computing influence at
evenly spaced epochs; each influence ranking of the corpus is scored per query by the average
precision of its relevant problems, for the final checkpoint, the trajectory (``li.aggregate``,
each weighting) and the ledger. Several training seeds; paired bootstrap intervals over
(seed, query) pairs.

    python benchmarks/trajectory_lm.py [--quick] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

import benchlib
import lightning_influence as li
from ledger_lds import ledger_total

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arithmetic_lm import (NAMES, OBJECTS, SEQUENCE_LENGTH, TEMPLATES, Problem, ProblemDataset,  # noqa: E402
                           TinyGPT, WordTokenizer, generate_problems)

FULL = dict(train_size=600, queries=24, copies=2, epochs=30, every=5, width=64, seeds=3)
QUICK = dict(train_size=120, queries=6, copies=2, epochs=4, every=2, width=32, seeds=1)
WEIGHTINGS = ("mean_abs", "lr", "recency")
BATCH_SIZE = 32


def key(problem: Problem) -> Tuple[str, int, int]:
    """Template and operands: what makes two problems teach the same answer."""
    a, b = [int(word) for word in problem.text.split() if word.isdigit()][:2]
    return problem.template, a, b


def near_duplicate(problem: Problem, rng: random.Random) -> Problem:
    """The same template, operands and answer, told with another name and object."""
    template, a, b = key(problem)
    while True:
        name, other = rng.sample(NAMES, 2)
        text = TEMPLATES[template].format(name=name, other=other, obj=rng.choice(OBJECTS), a=a, b=b)
        if text != problem.text:
            return Problem(template, text, problem.answer)


def corpus(cfg: Dict, seed: int):
    """Training set with planted near-duplicates, queries, and per query the relevant training indices."""
    rng = random.Random(seed)
    queries = generate_problems(cfg["queries"], rng)
    planted = {p.text: p for q in queries for p in (near_duplicate(q, rng) for _ in range(cfg["copies"]))}
    exclude = frozenset(q.text for q in queries) | frozenset(planted)
    background = generate_problems(cfg["train_size"] - len(planted), rng, exclude=exclude)
    problems = background + list(planted.values())
    rng.shuffle(problems)
    relevant = [[i for i, p in enumerate(problems) if key(p) == key(q)] for q in queries]
    tokenizer = WordTokenizer()
    return (ProblemDataset(problems, tokenizer, SEQUENCE_LENGTH),
            ProblemDataset(queries, tokenizer, SEQUENCE_LENGTH, answer_only=True), relevant)


def average_precision(scores: Tensor, relevant: List[List[int]]) -> Tensor:
    """Per query: the average precision of its relevant training examples in the ranking by score."""
    values = []
    for row, members in zip(scores, relevant):
        is_relevant = torch.zeros(len(row), dtype=torch.bool)
        is_relevant[members] = True
        hits = is_relevant[row.argsort(descending=True)].double()
        precision = hits.cumsum(0) / torch.arange(1, len(row) + 1)
        values.append(float((precision * hits).sum() / hits.sum()))
    return torch.tensor(values, dtype=torch.float64)


def train(cfg: Dict, seed: int, data: Dataset, callbacks: Sequence[pl.Callback] = ()) -> TinyGPT:
    """The recipe: TinyGPT, AdamW, ``cfg["epochs"]`` shuffled epochs, all seeded by ``seed``."""
    pl.seed_everything(seed, verbose=False)
    model = TinyGPT(len(WordTokenizer().vocab), SEQUENCE_LENGTH, width=cfg["width"])
    trainer = pl.Trainer(max_epochs=cfg["epochs"], callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, DataLoader(data, batch_size=BATCH_SIZE, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed)))
    return model


def removal_effect(cfg: Dict, seed: int) -> Tensor:
    """Per query: how much lower its answer's log-probability is after training without every
    relevant problem (of all queries): the check that the ground truth is causal, not a label."""
    train_set, query_set, relevant = corpus(cfg, seed)
    removed = {index for members in relevant for index in members}
    kept = Subset(train_set, [i for i in range(len(train_set)) if i not in removed])
    queries = next(iter(DataLoader(query_set, batch_size=len(query_set))))
    with torch.no_grad():
        full, without = (li.CausalLMTask().measurement(train(cfg, seed, data).eval(), queries).double()
                         for data in (train_set, kept))
        return full - without


def run_seed(cfg: Dict, seed: int) -> Dict[str, Tensor]:
    """Per-query average precision of every method, for one corpus and training seed."""
    train_set, query_set, relevant = corpus(cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        callback = li.InfluenceCallback(task=li.CausalLMTask(), query_data=query_set, train_data=train_set,
                                        every_n_epochs=cfg["every"], on_train_end=False,
                                        curvature={"loss_reduction": "token_mean"}, scoring={"ledger": 32},
                                        output_dir=tmp,
                                        report=li.ReportConfig(mode="off", log_artifacts=False, show_progress=False))
        train(cfg, seed, train_set, [callback])
        results = callback.results
        methods = {"final checkpoint": results[-1].scores,
                   **{f"trajectory ({len(results)}), {w}": li.aggregate(results, weighting=w).scores
                      for w in WEIGHTINGS},
                   "ledger (default collection)": ledger_total(results, len(train_set))}
        return {name: average_precision(scores.double(), relevant) for name, scores in methods.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    per_seed = [run_seed(cfg, seed) for seed in range(cfg["seeds"])]
    effect = benchlib.bootstrap_ci(torch.cat([removal_effect(cfg, seed) for seed in range(cfg["seeds"])]))
    per_query = {name: torch.cat([values[name] for values in per_seed]) for name in per_seed[0]}
    final = per_query["final checkpoint"]
    rows, diff_rows, payload = [], [], {}
    for name, values in per_query.items():
        mean, low, high = benchlib.bootstrap_ci(values)
        rows.append([name, benchlib.fmt_ci(mean, low, high)])
        payload[name] = {"average_precision": mean, "ci": [low, high]}
        if name != "final checkpoint":
            d_mean, d_low, d_high = benchlib.bootstrap_ci(values - final)
            diff_rows.append([name, benchlib.fmt_ci(d_mean, d_low, d_high)])
            payload[name]["minus_final"] = {"difference": d_mean, "ci": [d_low, d_high]}
    chance = cfg["copies"] / cfg["train_size"]
    setup = (f"Arithmetic word problems (examples/arithmetic_lm.py): {cfg['train_size']} training sequences of which "
             f"{cfg['copies']} planted near-duplicates (same template and operands, other name and object) per "
             f"query, {cfg['queries']} held-out queries (answer log-probability); TinyGPT width {cfg['width']}, 2 "
             f"blocks, AdamW lr 3e-3, {cfg['epochs']} epochs (batch {BATCH_SIZE}); `li.InfluenceCallback` "
             f"(defaults, EK-FAC from the training steps, `scoring.ledger=32`) every {cfg['every']} epochs; "
             f"{cfg['seeds']} seeds (corpus, initialisation and order). Metric: average precision of the query's "
             f"relevant training problems (same template and operands) in the ranking by influence (chance about "
             f"{chance:.3f}); mean over seed x query pairs [95% bootstrap interval]. Ground-truth check: retraining "
             "without all relevant problems lowers the queries' answer log-probability by "
             f"{benchlib.fmt_ci(*effect)} nats. {time.perf_counter() - started:.0f} s.")
    sections = [setup, benchlib.markdown_table(["influence", "average precision"], rows),
                "Paired differences to the final checkpoint (an interval excluding 0 is a real difference):",
                benchlib.markdown_table(["influence", "minus final"], diff_rows)]
    benchlib.emit(args, "Trajectory on the arithmetic language model (planted near-duplicates)", sections,
                  {"config": cfg, "methods": payload, "removal_effect": {"nats": effect[0], "ci": list(effect[1:])}})
    return payload


if __name__ == "__main__":
    main()
