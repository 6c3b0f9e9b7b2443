"""Which training sequences teach a tiny language model arithmetic? (Grosse et al. 2023, in miniature.)

A two-layer GPT-style model learns word problems such as

    tom has 3 apples and buys 4 more . how many apples now ? 7

from a generated corpus of four templates (addition told two ways, subtraction, multiplication).
``InfluenceCallback`` collects EK-FAC curvature from the training steps themselves and, at every
checkpoint, scores every training sequence against held-out problems. The query measurement is
the log-probability of the answer given the question, so a positive score means "training on this
sequence made the right answer more likely".

    python examples/arithmetic_lm.py            # about 2 minutes on a laptop CPU
    python examples/arithmetic_lm.py --quick    # a few seconds, for smoke tests

It prints the most influential training sequences per query with their most influential tokens
highlighted, how influence is spread over layers, the heavy tail of the scores, how the ranking
changes between checkpoints, and where the results, the HTML report and the W&B run are.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_influence as li
from lightning_influence.analysis import summarize
from lightning_influence.reporting import DefaultRenderer
from lightning_influence.reporting.html import write_html_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HelpFormatter, add_common_arguments, highlight_tokens, logger_location,  # noqa: E402
                    make_logger, section, set_up, use_color)  # noqa: E402

# -- the corpus ------------------------------------------------------------------------------------

TEMPLATES = {
    "add": "{name} has {a} {obj} and buys {b} more . how many {obj} now ?",
    "sum": "{name} has {a} {obj} and {other} has {b} . how many {obj} together ?",
    "sub": "{name} had {a} {obj} and gave away {b} . how many {obj} are left ?",
    "mul": "{name} has {a} bags with {b} {obj} in each . how many {obj} in all ?",
}
NAMES = ("tom", "ann", "sam", "mia", "leo", "zoe")
OBJECTS = ("apples", "pens", "coins", "cards", "books", "shells")
MAX_NUMBER = 30  # numbers are single tokens 0..30
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
IGNORE = -100


@dataclass(frozen=True)
class Problem:
    """One word problem: its template, operands and answer."""

    template: str
    text: str
    answer: int


def _operands(template: str, rng: random.Random) -> tuple:
    if template == "mul":
        a, b = rng.randint(1, 5), rng.randint(1, 5)
        return a, b, a * b
    if template == "sub":
        a = rng.randint(2, 9)
        b = rng.randint(1, a)
        return a, b, a - b
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return a, b, a + b


def generate_problems(count: int, rng: random.Random, exclude: frozenset = frozenset()) -> List[Problem]:
    """``count`` distinct problems, none of them in ``exclude`` (held-out queries are new sentences)."""
    problems: Dict[str, Problem] = {}
    while len(problems) < count:
        template = rng.choice(sorted(TEMPLATES))
        name, other = rng.sample(NAMES, 2)
        a, b, answer = _operands(template, rng)
        text = TEMPLATES[template].format(name=name, other=other, obj=rng.choice(OBJECTS), a=a, b=b)
        if text not in exclude:
            problems[text] = Problem(template, text, answer)
    return list(problems.values())


class WordTokenizer:
    """Whitespace tokenizer over the corpus' closed vocabulary; every number is one token."""

    def __init__(self) -> None:
        words = {w for t in TEMPLATES.values() for w in t.split() if not w.startswith("{")}
        words |= set(NAMES) | set(OBJECTS)
        self.vocab = [PAD, BOS, EOS] + [str(n) for n in range(MAX_NUMBER + 1)] + sorted(words)
        self.index = {word: i for i, word in enumerate(self.vocab)}

    def encode(self, text: str) -> List[int]:
        """Token ids of a whitespace-separated text (no special tokens added)."""
        return [self.index[word] for word in text.split()]

    def tokens(self, ids: Sequence[int]) -> List[str]:
        """One string per id (the renderer's ``decode``); padding shows as nothing."""
        return ["" if self.vocab[i] == PAD else self.vocab[i] + " " for i in ids]

    def words(self, ids: Sequence[int]) -> List[str]:
        """The tokens of a sequence without padding, for the terminal."""
        return [self.vocab[i] for i in ids if self.vocab[i] != PAD]


class ProblemDataset(Dataset):
    """Fixed-length dict examples ``input_ids`` / ``attention_mask`` / ``labels`` (Hugging Face layout).

    With ``answer_only`` the labels keep only the answer token, so the loss — and the influence
    query measurement — is the answer's log-probability given the question, not the question's.
    """

    def __init__(self, problems: Sequence[Problem], tokenizer: WordTokenizer, length: int, answer_only: bool = False):
        self.problems = list(problems)
        ids = torch.full((len(problems), length), tokenizer.index[PAD])
        labels = torch.full((len(problems), length), IGNORE)
        for row, problem in enumerate(problems):
            seq = [tokenizer.index[BOS], *tokenizer.encode(f"{problem.text} {problem.answer}"), tokenizer.index[EOS]]
            ids[row, : len(seq)] = torch.tensor(seq)
            if answer_only:
                labels[row, len(seq) - 2] = seq[-2]
            else:
                labels[row, : len(seq)] = torch.tensor(seq)
        self.input_ids, self.labels = ids, labels
        self.attention_mask = (ids != tokenizer.index[PAD]).long()

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


SEQUENCE_LENGTH = 19  # <bos> + the longest question (16 words) + answer + <eos>


def make_datasets(train_size: int = 1500, queries: int = 16, seed: int = 0):
    """The training corpus and held-out queries (problems that are not in the corpus)."""
    rng = random.Random(seed)
    tokenizer = WordTokenizer()
    train_problems = generate_problems(train_size, rng)
    query_problems = generate_problems(queries, rng, exclude=frozenset(p.text for p in train_problems))
    return (ProblemDataset(train_problems, tokenizer, SEQUENCE_LENGTH),
            ProblemDataset(query_problems, tokenizer, SEQUENCE_LENGTH, answer_only=True))


def train_dataset() -> ProblemDataset:
    """The default run's training corpus (for ``lightning-influence score --train-data``)."""
    return make_datasets()[0]


def new_queries() -> ProblemDataset:
    """Problems written after training, to score with the saved factors
    (``lightning-influence score --query-data examples/arithmetic_lm.py:new_queries``)."""
    problems = [Problem("add", "ann has 4 pens and buys 5 more . how many pens now ?", 9),
                Problem("mul", "leo has 4 bags with 2 coins in each . how many coins in all ?", 8)]
    return ProblemDataset(problems, WordTokenizer(), SEQUENCE_LENGTH, answer_only=True)


# -- the model -------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block. Attention is written with ``nn.Linear`` layers (not
    ``nn.MultiheadAttention``, whose output projection bypasses module hooks) so every weight
    matrix is tracked."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(pl.LightningModule):
    """A GPT-style causal LM with tied input/output embeddings (the unembedding is not tracked,
    as in the paper). ``forward(input_ids) -> logits [B, T, V]`` is what ``CausalLMTask`` calls."""

    def __init__(self, vocab_size: int, length: int, width: int = 64, depth: int = 2, heads: int = 4,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T

    def _loss(self, batch) -> tuple:
        logits = self(batch["input_ids"])[:, :-1]
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        counted = targets != IGNORE
        accuracy = (logits.argmax(-1) == targets)[counted].float().mean()
        return loss, accuracy

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)  # mean over the tokens that count: curvature.loss_reduction="token_mean"
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, accuracy = self._loss(batch)  # queries are labelled on the answer only
        self.log_dict({"val/answer_loss": loss, "val/answer_accuracy": accuracy}, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


# -- the run ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--train-size", type=int, default=1500, help="training sequences")
    parser.add_argument("--queries", type=int, default=16, help="held-out query problems")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--influence-every", type=int, default=4,
                        help="checkpoint and compute influence every N epochs")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--width", type=int, default=64, help="model width")
    parser.add_argument("--show", type=int, default=3, help="queries printed with their top sequences")
    parser.add_argument("--quick", action="store_true",
                        help="a small, fast run for smoke tests (300 sequences, 2 epochs, influence every epoch)")
    add_common_arguments(parser, default_output="runs/arithmetic_lm", quick_output="runs/arithmetic_lm_quick")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train, compute influence at checkpoints, print the findings; returns paths and headline numbers."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.train_size, args.epochs, args.influence_every, args.queries = 300, 2, 1, 8
    started = time.perf_counter()
    set_up(args)

    tokenizer = WordTokenizer()
    train_set, query_set = make_datasets(args.train_size, args.queries, args.seed)
    model = TinyGPT(len(tokenizer.vocab), SEQUENCE_LENGTH, width=args.width)

    # The two lines that matter: a checkpoint every N epochs, and influence computed at each one.
    checkpoints = ModelCheckpoint(dirpath=args.output_dir / "checkpoints", every_n_epochs=args.influence_every,
                                  save_top_k=-1)
    influence = li.InfluenceCallback(
        task=li.CausalLMTask(),
        query_data="val",                    # the first num_queries validation examples
        num_queries=args.queries,
        every_n_epochs=args.influence_every,  # fires at the same step as the checkpoint: one computation
        # output_dir unset: <log dir>/influence, or influence-v1, -v2, ... when an earlier run is there
        # training_step returns a mean over tokens, as Hugging Face does
        curvature=li.CurvatureConfig(loss_reduction="token_mean"),
        scoring=li.ScoringConfig(top_k=5),
        report=li.ReportConfig(renderer=DefaultRenderer(decode=tokenizer.tokens), show_progress=False),
    )
    logger = make_logger(args, project="arithmetic-lm")
    trainer = pl.Trainer(
        max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[checkpoints, influence], logger=logger,
        accelerator="cpu", devices=1, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=10, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(query_set, batch_size=64))

    results = influence.results
    results_dir = Path(results[0].path).parent
    color = use_color(args.color)
    report_path = write_html_report(results, args.output_dir / "report.html", train_dataset=train_set,
                                    query_dataset=query_set, renderer=DefaultRenderer(decode=tokenizer.tokens),
                                    top_k=5, title="Arithmetic word problems: influence report")
    accuracy = float(trainer.callback_metrics.get("val/answer_accuracy", float("nan")))
    seconds = time.perf_counter() - started

    section("Where everything is")
    print(f"influence results : {results_dir}  ({len(results)} checkpoints: "
          f"steps {[r.step for r in results]})")
    print(f"HTML report       : {report_path}")
    print(f"logger run        : {logger_location(logger)}")
    print(f"checkpoints       : {args.output_dir / 'checkpoints'}")
    print(f"final answer accuracy on the queries: {accuracy:.0%}; total time {seconds:.0f} s")

    last = results[-1]
    print_top_sequences(last, train_set, query_set, tokenizer, args.show, color)
    summary = summarize(last)
    print_layers(summary)
    print_tail(summary)
    structure = template_agreement(last, train_set, query_set, k=10)
    section("Do the top sequences share the query's structure?")
    print(f"among each query's 10 most influential sequences (step {last.step}):")
    for key, label in (("template", "same template"), ("answer", "same answer")):
        print(f"  {label:<14}: {structure[key]:.0%}   (by chance: {structure[key + '_chance']:.0%})")
    comparison = print_comparison(results)
    if not args.no_wandb:
        import wandb

        wandb.finish()
    return {
        "results_dir": results_dir, "report": report_path, "results": results,
        "accuracy": accuracy, "summary": summary, "structure": structure, "comparison": comparison,
        "seconds": seconds, "train_set": train_set, "query_set": query_set,
    }


# -- what the run found ----------------------------------------------------------------------------

def _problem_line(dataset: ProblemDataset, index: int, tokenizer: WordTokenizer,
                  token_scores: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                  color: bool = False) -> str:
    ids = dataset.input_ids[index]
    real = int(dataset.attention_mask[index].sum())
    words = tokenizer.words(ids[:real].tolist())
    if token_scores is None:
        return " ".join(words)
    return highlight_tokens(words, token_scores[:real], None if mask is None else mask[:real], color=color)


def print_top_sequences(result, train_set, query_set, tokenizer, shown: int, color: bool) -> None:
    """Per query: its three most helpful training sequences (highlighted tokens) and the most harmful one."""
    section(f"Most influential training sequences (step {result.step})")
    print("score > 0: training on the sequence raised the probability of the query's answer.")
    print("highlighted: tokens whose positions carry >= 25% of the sequence's largest token score "
          + ("(red helps, blue hurts)" if color else "([+tok] helps, [-tok] hurts)"))
    top_ids, top_tokens, top_mask = result.get("top_ids"), result.get("top_token_scores"), result.get("top_token_mask")
    bottom_ids = result.get("bottom_ids")
    column = {int(t): j for j, t in enumerate(result.train_ids.tolist())}
    for q, query_id in enumerate(result.query_ids.tolist()[:shown]):
        print(f"\nquery {query_id}: {_problem_line(query_set, query_id, tokenizer)}")
        for rank in range(min(3, top_ids.shape[1])):
            train_id = int(top_ids[q, rank])
            score = float(result.scores[q, column[train_id]])
            line = _problem_line(train_set, train_id, tokenizer, top_tokens[q, rank], top_mask[q, rank], color)
            print(f"  {score:+9.3g}  #{train_id:<5} {line}")
        worst = int(bottom_ids[q, 0])
        print(f"  {float(result.scores[q, column[worst]]):+9.3g}  #{worst:<5} "
              f"{_problem_line(train_set, worst, tokenizer)}   (most harmful)")


def print_layers(summary) -> None:
    """Mean share of |influence| per tracked layer, as a text bar chart."""
    section("Where in the network the influence flows (mean share of |score| per layer)")
    shares = summary.layer_shares.nanmean(0)
    for name, share in zip(summary.layer_names, shares.tolist()):
        print(f"  {name:<16} {share:6.1%} {'#' * round(share * 60)}")


def print_tail(summary) -> None:
    """Power-law fit of the positive scores and how concentrated influence is."""
    section("How heavy is the tail? (tail fit to positive scores, median over queries)")
    s = summary.scalars
    if "tail_alpha" in s:
        print(f"  slope alpha {s['tail_alpha']:.2f} above xmin {s['tail_xmin']:.3g} "
              f"({s['tail_n']:.0f} sequences in the tail, KS distance {s['tail_ks']:.3f})")
        print(f"  a power law is plausible for {s.get('tail_plausible_fraction', math.nan):.0%} of the queries "
              "(likelihood-ratio tests against log-normal and exponential tails); elsewhere alpha is only the "
              "slope of a heavy tail")
    else:
        print("  too few positive scores for a fit")
    print(f"  top 1% of sequences hold {s.get('top1pct_share', math.nan):.0%} and the top 10% hold "
          f"{s.get('top10pct_share', math.nan):.0%} of the positive influence; Gini {s.get('gini', math.nan):.2f}")


def template_agreement(result, train_set, query_set, k: int) -> Dict[str, float]:
    """Share of each query's top-k training sequences with the query's template / answer, and the
    share expected by chance (the pool's frequency of that template / answer)."""
    train = [train_set.problems[int(i)] for i in result.train_ids]
    top = result.scores.topk(min(k, result.num_train), dim=1).indices
    same = {"template": [], "answer": [], "template_chance": [], "answer_chance": []}
    for q, query_id in enumerate(result.query_ids.tolist()):
        query = query_set.problems[query_id]
        for key in ("template", "answer"):
            wanted = getattr(query, key)
            same[key].append(sum(getattr(train[j], key) == wanted for j in top[q].tolist()) / top.shape[1])
            same[key + "_chance"].append(sum(getattr(p, key) == wanted for p in train) / len(train))
    return {key: sum(values) / len(values) for key, values in same.items()}


def print_comparison(results) -> Optional[object]:
    """How the ranking of training sequences changed from the first to the last checkpoint."""
    section("Across checkpoints")
    if len(results) < 2:
        print("  one checkpoint only: nothing to compare (train longer or compute influence more often)")
        return None
    for earlier, later in zip(results, results[1:]):
        rho = li.compare(earlier, later, ks=(10,)).spearman.nanmean()
        print(f"  step {earlier.step:>4} -> {later.step:>4}: Spearman rank correlation {float(rho):.2f}")
    comparison = li.compare(results[0], results[-1], ks=(1, 10, 50), top_k_changes=5)
    print()
    print(comparison.format_table(max_queries=3))
    return comparison


if __name__ == "__main__":
    main()
