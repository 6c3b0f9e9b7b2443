"""Training-step overhead of InfluenceCallback versus plain training, measured in one run.

A small GPT-style transformer trains on random tokens with a real ``pl.Trainer``; the time of
each training step (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
optimizer step, and the callback's statistics) is recorded for plain training and for each
callback setting, in alternating rounds so that machine noise hits every setting alike. Influence
computations are not training steps and are excluded (they run only at the end of each run).
Two training set-ups are measured with and without the callback as well: activation checkpointing
(``torch.utils.checkpoint`` on every block) and ``torch.compile`` (with ``--quick``, the
``aot_eager`` backend, which compiles in seconds; otherwise the default inductor backend). The
first 4 steps of every run (compilation, warm-up) are left out.

    python benchmarks/training_overhead.py [--steps 40] [--rounds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

import benchlib
import lightning_influence as li
from lightning_influence.loops.callback import InfluenceCallback


class TinyGPT(pl.LightningModule):
    def __init__(self, vocab: int = 256, width: int = 128, depth: int = 2, heads: int = 4, context: int = 64,
                 checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(benchlib.Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointing and self.training else block(h)
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class RandomTokens(Dataset):
    def __init__(self, n: int, context: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, context), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index]}


class StepTimer(pl.Callback):
    """Per optimizer step: its wall time and the global step it ran as."""

    def __init__(self) -> None:
        self.times, self.steps = [], []

    def on_train_batch_start(self, trainer, *args):
        self._start = time.perf_counter()
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._start)


def run(setting, steps: int, batch_size: int, tmp: str, checkpointing: bool = False,
        compile_backend=None) -> StepTimer:
    data = RandomTokens(steps * batch_size, 64, 256)
    timer = StepTimer()
    callbacks = [timer]
    if setting is not None:
        # Only the end-of-training trigger, on a tiny pool: its cost is outside the timed steps.
        setting = dict(setting)
        queries = torch.utils.data.Subset(data, range(setting.pop("num_query_examples", 2)))
        callbacks.insert(0, InfluenceCallback(li.CausalLMTask(), query_data=queries,
                                              train_data=torch.utils.data.Subset(data, range(4)), every_n_epochs=None,
                                              on_checkpoint=False,
                                              report=li.ReportConfig(mode="off", show_progress=False),
                                              output_dir=tempfile.mkdtemp(dir=tmp),  # a run of its own
                                              curvature={"correction_batches": 1, **setting.pop("curvature", {})},
                                              scoring={"batch_size": 4, **setting.pop("scoring", {})}, **setting))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    model = TinyGPT(checkpointing=checkpointing)
    trainer.fit(torch.compile(model, backend=compile_backend) if compile_backend else model,
                DataLoader(data, batch_size=batch_size))
    return timer


def paired_ratio(timer: StepTimer, every: int) -> float:
    """Collected steps vs the idle steps between them, in the same run (robust to machine load)."""
    pairs = [(t, s % every == 0) for t, s in zip(timer.times, timer.steps) if s >= 4]
    collected = statistics.median(t for t, c in pairs if c)
    idle = statistics.median(t for t, c in pairs if not c)
    return collected / idle


def main(argv=None) -> dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv, **{
        "--steps": dict(type=int, default=40, help="training steps per run"),
        "--rounds": dict(type=int, default=3, help="alternating rounds of every setting"),
        "--batch-size": dict(type=int, default=16),
    })
    if args.quick:
        args.steps, args.rounds = 12, 1
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    defaults = li.CurvatureConfig()
    default_every = defaults.collect_every_n_steps
    default_tokens = defaults.max_tokens_per_step
    # Runs alternate so that load on the machine hits every setting alike.
    settings = {"plain": None, "callback, default settings": {}}
    # Paired: collected steps against the idle steps of the same run. For the defaults the
    # amortised ratio over all steps is 1 + (paired - 1) / collect_every_n_steps.
    paired = {"callback, default settings (amortised)": {},
              "collecting on every step": dict(curvature={"collect_every_n_steps": 2, "max_tokens_per_step": None}),
              "collecting on every step, max 256 tokens":
                  dict(curvature={"collect_every_n_steps": 2, "max_tokens_per_step": 256}),
              # The per-step ledger (issue 16) at its usual 32 directions, with 64 queries: it scores each
              # collected batch.
              "callback, default settings + ledger, 64 queries (amortised)":
                  dict(scoring={"ledger": 32}, num_query_examples=64),
              # Its cost is the two thin projections per layer, proportional to scoring.ledger: half of it.
              "callback, default settings + ledger, scoring.ledger=16, 64 queries (amortised)":
                  dict(scoring={"ledger": 16}, num_query_examples=64)}
    # Training set-ups, each measured without and with the callback (default settings).
    backend = "aot_eager" if args.quick else "inductor"
    setups = {"activation checkpointing": dict(checkpointing=True),
              f"torch.compile ({backend})": dict(compile_backend=backend)}
    times = {name: [] for name in settings}
    setup_times = {(name, with_callback): [] for name in setups for with_callback in (False, True)}
    ratios = {name: [] for name in paired}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, setting in settings.items():
                times[name].extend(run(setting, args.steps, args.batch_size, tmp).times[4:])
            for (name, with_callback), values in setup_times.items():
                values.extend(run({} if with_callback else None, args.steps, args.batch_size, tmp,
                                  **setups[name]).times[4:])
            for name, setting in paired.items():
                every = setting.get("curvature", {}).get("collect_every_n_steps", default_every)
                ratio = paired_ratio(run(setting, args.steps, args.batch_size, tmp), every)
                amortised = "collect_every_n_steps" not in setting.get("curvature", {})
                ratios[name].append(1 + (ratio - 1) / default_every if amortised else ratio)
    base = statistics.median(times["plain"])
    rows = [[name, 1000 * statistics.median(values), statistics.median(values) / base, "alternating runs"]
            for name, values in times.items()]
    rows += [[name, "-", statistics.median(values), "collected vs idle steps of one run"]
             for name, values in ratios.items()]
    for name in setups:
        own_base = statistics.median(setup_times[name, False])
        rows += [[f"{name}, plain", 1000 * own_base, own_base / base, "alternating runs, vs plain"],
                 [f"{name}, callback, default settings", 1000 * statistics.median(setup_times[name, True]),
                  statistics.median(setup_times[name, True]) / own_base, f"alternating runs, vs {name}, plain"]]
    intro = (f"Training-step time of a small GPT-style transformer (2 blocks, width 128, context 64, batch "
             f"{args.batch_size}), {torch.get_num_threads()} CPU thread(s); callback defaults: "
             f"curvature.collect_every_n_steps={default_every}, curvature.max_tokens_per_step={default_tokens}. A step is forward, "
             "backward, optimizer step and the callback's statistics; influence computations are excluded.")
    table = benchlib.markdown_table(["setting", "median step (ms)", "ratio", "measured as"], rows)
    payload = {"rows": rows, "batch_size": args.batch_size, "collect_every_n_steps": default_every,
               "max_tokens_per_step": default_tokens, **benchlib.environment()}
    benchlib.emit(args, "Training overhead of the callback", [intro, table], payload)
    return payload


if __name__ == "__main__":
    main()
