"""Planned per-process memory (``li.plan_memory``; planned, not run) for GPT-2 and Llama shapes on
8 to 64 processes: replicated, sharded (``shard_factors`` and ``shard_statistics``) and sharded with
shared inputs. The models are built on the meta device from their configurations (no weights).
``tests/engine/test_memory_plan.py`` checks the planner's bytes against measured tensors on small models.

    python benchmarks/memory_plan.py [--quick] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import transformers

import benchlib
import lightning_influence as li
from lightning_influence.engine.memory_plan import model_on_meta

GIB = 2**30
LLAMA_VOCABULARY = 32000
MODELS = {  # name -> configuration (published shapes)
    "GPT-2 (124M)": lambda: transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "Llama-7B": lambda: transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                 num_attention_heads=32, vocab_size=LLAMA_VOCABULARY),
    "Llama-13B": lambda: transformers.LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                                  num_attention_heads=40, vocab_size=LLAMA_VOCABULARY),
    "Llama-70B": lambda: transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                  num_attention_heads=64, num_key_value_heads=8,
                                                  vocab_size=LLAMA_VOCABULARY),
}
LAYOUTS = {  # name -> settings
    "replicated": dict(),
    "sharded": dict(shard_factors=True, shard_statistics=True),
}
WORLD_SIZES = (8, 16, 32, 64)
# Scoring settings of the table: the paper's rank-32 queries, and a bounded record of scores per query.
SCORING = dict(num_queries=64, query_rank=32, keep_top_scores=1000)


def gib(count: int) -> str:
    """GiB with three significant digits, whole GiB with thousands separators from 100 up."""
    value = count / GIB
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = benchlib.parse_args(__doc__.splitlines()[0], argv)
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    plans = {}
    for model_name in models:
        model = model_on_meta(MODELS[model_name]())
        for layout, settings in LAYOUTS.items():
            for world in WORLD_SIZES:
                plans[model_name, layout, world] = li.plan_memory(model, world_size=world, **settings, **SCORING)
    summary = [[model_name, layout] + [f"{gib(plans[model_name, layout, w].statistics)} / "
                                       f"{gib(plans[model_name, layout, w].factors)}" for w in WORLD_SIZES]
               + [gib(plans[model_name, layout, WORLD_SIZES[0]].queries)]
               for model_name in models for layout in LAYOUTS]
    detail = [[model_name, layout, world, len(plan.layers)] + [gib(getattr(plan, part)) for part in (
        "statistics", "factors", "queries")] + [f"{plan.score_chunk / 2**20:.3g}", f"{plan.scores / 2**20:.3g}",
                                                gib(plan.total)]
              for (model_name, layout, world), plan in plans.items()]
    settings = ", ".join(f"{key}={value}" for key, value in SCORING.items())
    sections = [
        "Planned, not run: `li.plan_memory` on each model built on the meta device, default layer selection "
        f"(every `nn.Linear` / `Conv1D`; GPT-2's tied unembedding left out, Llama's untied `lm_head` tracked), "
        f"float32 statistics, float64 EK-FAC eigenbases, {settings}. Per process, the busiest one.\n\n"
        "Statistics / factors per process (GiB) by number of processes; queries (GiB) are held by every process:"
        "\n\n<!-- --8<-- [start:summary] -->\n"
        + benchlib.markdown_table(["model", "layout"] + [f"{w} processes" for w in WORLD_SIZES] + ["queries"], summary)
        + "\n<!-- --8<-- [end:summary] -->",
        "Every component per process (GiB; score chunk and kept scores in MiB):\n\n"
        + benchlib.markdown_table(["model", "layout", "processes", "layers", "statistics", "factors", "queries",
                                   "score chunk (MiB)", "kept scores (MiB)", "total"], detail),
    ]
    payload = {"environment": benchlib.environment(), "scoring": SCORING, "planned_not_run": True,
               "plans": [{"model": model_name, "layout": layout, "world_size": world, "layers": len(plan.layers),
                          **{part: getattr(plan, part) for part in ("statistics", "factors", "queries", "score_chunk",
                                                                    "scores", "total")}}
                         for (model_name, layout, world), plan in plans.items()]}
    benchlib.emit(args, "Memory per process at scale (planned, not run)", sections, payload)
    return payload


if __name__ == "__main__":
    main()
