"""Shared inputs, one covariance: statistics memory and collection time on a Hugging Face Llama.

Layers that read the same input tensor (q/k/v projections, gate/up) share one activation
covariance (one ``d x d`` sum and one Gram per step instead of 3 or 2). A Llama built from its
configuration (hidden 256, intermediate 688, 4 layers: nothing downloaded) runs forward and backward
on random tokens with :class:`~lightning_influence.StepStatistics` collecting, with sharing on and
off, in alternating rounds so that machine noise hits both alike; plain forward/backward steps give
the plain step time; the collection's own time is measured inside each step (the statistics'
gradient hooks, where the Grams are formed, and the commit). Memory: the bytes of the sums and of
one step's buffer (``statistics_bytes()`` of the callback).

    python benchmarks/shared_inputs.py [--steps 12] [--rounds 3] [--quick] [--markdown out.md]
"""

from __future__ import annotations

import statistics as stats
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import benchlib
import lightning_influence as li
from lightning_influence.engine.collector import StepStatistics


def llama(quick: bool):
    import transformers

    torch.manual_seed(0)
    width, inner, depth = (64, 172, 2) if quick else (256, 688, 4)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=inner,
                                      num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def step_seconds(model, batches, task, statistics: Optional[StepStatistics]) -> Tuple[List[float], List[float]]:
    """Seconds of each forward + backward (+ the statistics' commit), and of the collection's own
    work in it (the statistics' gradient hooks and commit, timed inside the step)."""
    times, own = [], []
    spent = [0.0]
    if statistics is not None:
        collect = statistics.tracker.on_gradient

        def timed(*args):
            started = time.perf_counter()
            collect(*args)
            spent[0] += time.perf_counter() - started

        statistics.tracker.on_gradient = timed
    for batch in batches:
        spent[0] = 0.0
        started = time.perf_counter()
        if statistics is not None:
            statistics.begin_batch(batch)
        loss = task.loss(model, batch).mean()
        if statistics is not None:
            statistics.begin_backward()
        loss.backward()
        if statistics is not None:
            statistics.end_batch()
            committing = time.perf_counter()
            statistics.commit()
            spent[0] += time.perf_counter() - committing
        times.append(time.perf_counter() - started)
        own.append(spent[0])
        model.zero_grad(set_to_none=True)
    return times, own


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv,
                               **{"--steps": dict(type=int, default=12), "--rounds": dict(type=int, default=3)})
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    model = llama(args.quick)
    task = li.CausalLMTask()
    generator = torch.Generator().manual_seed(0)
    length, batch_size = (32, 2) if args.quick else (128, 4)
    batches = [{"input_ids": torch.randint(1, 512, (batch_size, length), generator=generator)} for _ in range(steps)]
    layers = li.select_layers(model)
    runs: Dict[str, List[float]] = {"plain": [], "shared": [], "per layer": []}
    own: Dict[str, List[float]] = {"shared": [], "per layer": []}
    held: Dict[str, int] = {}
    groups: List[List[str]] = []
    for _ in range(rounds):
        for setting in runs:
            statistics = None
            if setting != "plain":
                statistics = StepStatistics(layers, task, loss_reduction="mean", share_inputs=setting == "shared")
                statistics.attach()
            times, collecting = step_seconds(model, batches, task, statistics)
            runs[setting].extend(times[1:])  # the first step: warm-up (and the groups' discovery)
            if setting in own:
                own[setting].extend(collecting[1:])
            if statistics is not None:
                statistics.detach()
                held[setting] = statistics.held_bytes()
                groups = statistics.stats.input_groups or groups
    median = {setting: stats.median(times) for setting, times in runs.items()}
    collection = {setting: stats.median(times) for setting, times in own.items()}
    memory_ratio = held["shared"] / held["per layer"]
    time_ratio = collection["shared"] / collection["per layer"]
    config = model.config
    rows = [[setting, f"{held[setting] / 2**20:.2f}", f"{1e3 * median[setting]:.1f}", f"{1e3 * collection[setting]:.1f}"]
            for setting in ("per layer", "shared")]
    table = benchlib.markdown_table(["activation covariances", "statistics MiB", "step ms", "collection ms / step (hooks + commit)"],
                                    rows + [["plain step (no statistics)", "0", f"{1e3 * median['plain']:.1f}", "0"]])
    summary = (f"Llama (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
               f"{config.num_hidden_layers} layers; {len(layers)} tracked layers in {len(groups)} input groups: "
               f"{', '.join('/'.join(n.rsplit('.', 1)[-1] for n in g) for g in groups[:2])}, ...), batch {batch_size} x "
               f"{length} tokens, CPU, {torch.get_num_threads()} thread(s), median of {len(runs['plain'])} steps per "
               f"setting. Shared / per layer: statistics memory **{memory_ratio:.2f}x**, collection time "
               f"**{time_ratio:.2f}x**.")
    benchlib.emit(args, "Shared inputs, one covariance", [summary, table], {
        "environment": benchlib.environment(), "bytes": held, "median_step_seconds": median,
        "collection_seconds": collection, "memory_ratio": memory_ratio, "time_ratio": time_ratio,
        "groups": groups})


if __name__ == "__main__":
    main()
