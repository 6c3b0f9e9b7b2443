"""Shared pieces of the benchmark scripts: data, a batched trainer, timing, statistics, output.

The scripts import this module from their own directory (``python benchmarks/lds.py`` puts
``benchmarks/`` on ``sys.path``; the smoke test does the same).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances, accumulate_eigenvalue_correction
from lightning_influence.engine.statistics import CovarianceStatistics, EigenvalueCorrection
from lightning_influence.engine.tracking import select_layers

class Block(nn.Module):
    """A pre-norm transformer block of ``nn.Linear`` layers (every projection is tracked), shared by
    the speed benchmarks' GPT-style models."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        h = h + self.proj(attn)
        return h + self.out(F.gelu(self.fc(self.norm2(h))))


RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- command line and output -------------------------------------------------------------------------
def parse_args(description: str, argv: Optional[Sequence[str]] = None, **extra: Dict[str, Any]) -> argparse.Namespace:
    """The flags every benchmark shares: ``--quick`` (smoke run in seconds), ``--json``, ``--markdown``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables to this markdown file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads mostly spin)")
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) >= 1000 or abs(value) < 0.01 and value != 0 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(args: argparse.Namespace, title: str, sections: Sequence[str], payload: Dict[str, Any]) -> None:
    """Print the tables and write them (markdown) and the numbers (JSON) where asked."""
    text = f"## {title}\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def environment() -> Dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


# -- timing and statistics ---------------------------------------------------------------------------
def best_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Seconds of the fastest of ``repeats`` calls after ``warmup`` calls (the least noisy estimate
    of a deterministic workload on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation along the last axis (average ranks for ties are not needed: scores are real)."""
    return pearson(a.argsort(-1).argsort(-1).double(), b.argsort(-1).argsort(-1).double())


def pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def bootstrap_ci(values: Tensor, num: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """Mean and percentile bootstrap interval of per-query values (queries resampled)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(len(values), (num, len(values)), generator=gen)
    means = values[index].mean(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(values.mean()), float(low), float(high)


def fmt_ci(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


# -- data and models ---------------------------------------------------------------------------------
def digits(num_train: int, num_query: int, seed: int = 0) -> tuple:
    """scikit-learn's 8x8 digits, scaled to [0, 1]: a disjoint training pool and query set."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.as_tensor(y, dtype=torch.long)[perm]
    if num_train + num_query > len(x):
        raise ValueError(f"digits has {len(x)} examples; asked for {num_train} + {num_query}")
    return (x[:num_train], y[:num_train]), (x[num_train:num_train + num_query], y[num_train:num_train + num_query])


def mlp(widths: Sequence[int], activation: Callable[[], nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: List[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if index < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def load_member(model: nn.Module, params: Dict[str, Tensor], member: int = 0) -> nn.Module:
    """Copy one member of stacked parameters into ``model`` (in place) and return it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(params[name][member])
    return model


def train_ensemble(make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, subsets: Tensor,
                   seeds: Sequence[int], *, epochs: int, lr: float, batch_size: int, momentum: float = 0.9,
                   weight_decay: float = 0.0,
                   on_step: Optional[Callable[[Dict[str, Tensor], Tensor, Tensor], None]] = None,
                   on_epoch: Optional[Callable[[int, Dict[str, Tensor]], None]] = None) -> Dict[str, Tensor]:
    """Train one model per row of ``subsets`` (indices into ``x``, all rows equally long) at once.

    Member ``m`` starts from ``make_model()`` under ``torch.manual_seed(seeds[m])`` and runs SGD with
    momentum on mean cross-entropy over shuffled minibatches of its own subset, in an order drawn
    from its own seed: every member trains exactly as a lone model would, but the whole ensemble
    costs a few batched matrix products per step. This is what makes LDS retraining cheap.

    Returns the stacked parameters ``{name: [M, ...]}`` after training. ``on_step(params, xb, yb)``
    sees each step's parameters and batch before the update, ``on_epoch(epoch, params)`` the
    parameters after each epoch (1-based; copy them to keep a checkpoint).
    """
    base = make_model()
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        members.append({k: v.detach().clone() for k, v in make_model().named_parameters()})
    params = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    generators = [torch.Generator().manual_seed(10_000 + seed) for seed in seeds]

    def loss(p: Dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(base, p, (xb,)), yb)

    step_grads = vmap(grad(loss))
    size = subsets.shape[1]
    for epoch in range(1, epochs + 1):
        order = torch.stack([subset[torch.randperm(size, generator=g)] for subset, g in zip(subsets, generators)])
        for start in range(0, size, batch_size):
            index = order[:, start:start + batch_size]
            xb, yb = x[index], y[index]
            if on_step is not None:
                on_step(params, xb, yb)
            grads = step_grads(params, xb, yb)
            with torch.no_grad():
                for k in params:
                    g = grads[k] + weight_decay * params[k]
                    velocity[k].mul_(momentum).add_(g)
                    params[k].sub_(lr * velocity[k])
        if on_epoch is not None:
            on_epoch(epoch, params)
    return params


def ensemble_losses(make_model: Callable[[], nn.Module], params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy of every member on the same examples: ``[M, N]``."""
    base = make_model()

    def losses(p: Dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(base, p, (x,)), y, reduction="none")

    with torch.no_grad():
        return vmap(losses)(params)


class TrainingTimeCovariances:
    """Emulates what the callback collects: ``Σ a aᵀ`` and ``Σ g gᵀ`` from the training steps
    themselves (the data's own targets, i.e. the empirical Fisher, at each step's weights).

    Pass :meth:`on_step` to :func:`train_ensemble` (one member); :meth:`take` returns what was
    gathered since the last call and starts afresh, as the callback does at each checkpoint.
    After :meth:`start_lagged_correction` the steps also accumulate the EK-FAC eigenvalue
    correction in a fixed earlier basis: the "lagged basis" alternative to the callback's bounded
    correction pass at the checkpoint.
    """

    def __init__(self, model: nn.Module, task: li.Task) -> None:
        self.model, self.task = model, task
        self.layers = select_layers(model)
        self.stats = CovarianceStatistics(self.layers)
        self.lagged: Optional[EigenvalueCorrection] = None

    def on_step(self, params: Dict[str, Tensor], xb: Tensor, yb: Tensor) -> None:
        load_member(self.model, params)
        batch = TensorDataset(xb[0], yb[0])
        accumulate_covariances(self.model, self.task, batch, self.layers, fisher="empirical", batch_size=len(xb[0]),
                               into=self.stats)
        if self.lagged is not None:
            self.lagged.merge_(accumulate_eigenvalue_correction(
                self.model, self.task, batch, self.layers, self.lagged.bases, fisher="empirical",
                batch_size=len(xb[0])))

    def take(self) -> CovarianceStatistics:
        stats, self.stats = self.stats, CovarianceStatistics(self.layers)
        return stats

    def start_lagged_correction(self, bases: Dict[str, Dict[str, Tensor]]) -> None:
        self.lagged = EigenvalueCorrection(self.layers, bases)

    def lagged_factors(self) -> li.Factors:
        """EK-FAC in the lagged basis with the eigenvalues the steps gathered in it."""
        return li.Factors("ekfac", {layer.name: {"q_a": self.lagged.bases[layer.name]["q_a"],
                                                 "q_s": self.lagged.bases[layer.name]["q_s"],
                                                 "eigenvalues": self.lagged.mean(layer.name)}
                                    for layer in self.layers})


# -- kronfluence (benchmark-only dependency) ---------------------------------------------------------
def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except Exception:  # an incompatible install fails in many ways; any of them means "skip"
        return False
    return True


def _kronfluence_task():
    from kronfluence.task import Task

    class ClassificationKFTask(Task):
        """Summed cross-entropy, targets sampled from the model for the true Fisher (as ours)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(-1)
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationKFTask()


class Kronfluence:
    """kronfluence's EK-FAC on a copy of ``model`` (it wraps modules in place), heuristic damping
    (0.1 × mean eigenvalue, as ours), results in a private temporary directory."""

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        import copy
        import logging

        from kronfluence.analyzer import Analyzer, prepare_model

        logging.getLogger("kronfluence").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its torch.cuda.amp use
        self.batch_size = batch_size
        self.tmp = tempfile.TemporaryDirectory(prefix="kronfluence-")
        task = _kronfluence_task()
        self.model = prepare_model(copy.deepcopy(model).eval(), task)
        self.analyzer = Analyzer("bench", self.model, task, cpu=True, disable_tqdm=True, output_dir=self.tmp.name)
        self._count = 0

    def fit(self, train: TensorDataset, strategy: str = "ekfac") -> str:
        from kronfluence.arguments import FactorArguments

        self._count += 1
        name = f"factors{self._count}"
        self.analyzer.fit_all_factors(name, train, per_device_batch_size=self.batch_size,
                                      factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
        return name

    def scores(self, factors_name: str, query: TensorDataset, train: TensorDataset,
               rank: Optional[int] = None) -> Tensor:
        from kronfluence.arguments import ScoreArguments

        self._count += 1
        name = f"scores{self._count}"
        args = ScoreArguments(damping_factor=None, query_gradient_low_rank=rank)
        self.analyzer.compute_pairwise_scores(name, factors_name, query, train, per_device_query_batch_size=len(query),
                                              per_device_train_batch_size=self.batch_size, score_args=args,
                                              overwrite_output_dir=True)
        return self.analyzer.load_pairwise_scores(name)["all_modules"]

    def close(self) -> None:
        self.tmp.cleanup()

