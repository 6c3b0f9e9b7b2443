"""Per-process memory of influence computations, planned from a model's configuration alone.

Sizes follow from the tracked layers' shapes, so the model is built on the meta device (no weight is
allocated) and read with :func:`~lightning_influence.select_layers`, exactly as the callback selects
layers. Per process (rank), in bytes:

* ``statistics``: the training-time sums ``Σ a aᵀ`` ``[d_in, d_in]`` and ``Σ g gᵀ`` ``[d_out, d_out]``
  in ``covariance_dtype`` with their float64 counts, twice (the sums and one step's buffer) — what
  ``InfluenceCallback.statistics_bytes()`` reports; every layer, or with ``shard_statistics`` only
  the layers the process owns;
* ``factors``: EK-FAC ``q_a``, ``q_s`` in ``eigenbasis_dtype`` and the corrected eigenvalues
  ``[d_out, d_in]`` in float64; K-FAC the bases and both eigenvalue vectors (float64); diagonal the
  ``[d_out, d_in]`` float64 Fisher diagonal; identity nothing. With ``shard_factors``, owned layers only;
* ``queries``: the preconditioned query gradients every process holds (also sharded: owners broadcast
  them), ``Q·d_out·d_in`` per layer, or ``Q·r·(d_out + d_in)`` at ``query_rank`` r below
  ``min(d_out, d_in)``, in the model's parameter dtype;
* ``score_chunk``: one streamed batch's per-layer scores ``[L, Q, B]`` and their sum ``[Q, B]``, float32;
* ``scores``: what the result keeps: ``[Q, N]`` float32 over the pool, or with ``keep_top_scores`` M
  per query the top and bottom M scores with their ids and the sketch of the rest; plus the
  per-layer sums ``[L, Q]`` float64.

Layers are owned as the engine assigns them (:func:`~lightning_influence.engine.distributed.assign_owners`
balanced by :func:`~lightning_influence.engine.distributed.factor_cost`). Not counted: transient buffers
(float64 copies during eigendecompositions, a re-laid-out copy of a layer's queries made for the
contraction, the all-gather of dense scores), the fresh covariances of ``curvature.refresh``, the
per-token scores of the top examples, and the model, optimizer and activations of training itself.

Layers that read the same tensor share one activation covariance and eigenbasis, as the engine
finds at run time (:func:`input_groups` names the groups it finds in Hugging Face models): counted
once per group, or once per process holding members of the group when the layers are sharded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lightning_influence.engine import distributed
from lightning_influence.engine.approximations import approximation
from lightning_influence._format import format_number
from lightning_influence.config import CurvatureConfig, InfluenceConfig, ScoringConfig
from lightning_influence.analysis.sketch import MOMENTS, NUM_BINS
from lightning_influence.engine.tracking import TrackedLayer, select_layers

FLOAT64_BYTES = 8  # counts, eigenvalues, the EK-FAC / diagonal [d_out, d_in] values, score sums and moments
SCORE_BYTES = 4  # scores are float32
ID_BYTES = 8  # example ids are int64
# Layers of one Hugging Face block that read the same input tensor, by the last part of their module
# path (Llama, Mistral, Qwen and other Llama-style models; GPT-2 fuses q/k/v into one ``c_attn`` already).
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
ModelSource = Any  # an nn.Module, a transformers PretrainedConfig, a config.json path or a model type


def _default(name: str) -> Any:
    """The callback's default for setting ``name`` (one source of truth: the config dataclasses)."""
    for group in (InfluenceConfig, CurvatureConfig, ScoringConfig):
        if name in group.__dataclass_fields__:
            return group.__dataclass_fields__[name].default
    raise KeyError(name)


@dataclass(frozen=True)
class LayerMemory:
    """One tracked layer's bytes: statistics and factors on its owner (``None``: every process, not
    sharded), queries on every process."""

    name: str
    d_out: int
    d_in: int
    owner: Optional[int]
    statistics: int
    factors: int
    queries: int


@dataclass(frozen=True)
class ProcessMemory:
    """What one process holds, in bytes (``scores`` is ``None`` when the pool size is unknown)."""

    rank: int
    statistics: int
    factors: int
    queries: int
    score_chunk: int
    scores: Optional[int]

    @property
    def total(self) -> int:
        return self.statistics + self.factors + self.queries + self.score_chunk + (self.scores or 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Planned (not measured) memory per process; :attr:`peak` is the process that holds the most."""

    settings: Dict[str, Any]
    layers: List[LayerMemory]
    processes: List[ProcessMemory]

    @property
    def peak(self) -> ProcessMemory:
        return max(self.processes, key=lambda process: (process.total, -process.rank))

    @property
    def statistics(self) -> int:
        return self.peak.statistics

    @property
    def factors(self) -> int:
        return self.peak.factors

    @property
    def queries(self) -> int:
        return self.peak.queries

    @property
    def score_chunk(self) -> int:
        return self.peak.score_chunk

    @property
    def scores(self) -> Optional[int]:
        return self.peak.scores

    @property
    def total(self) -> int:
        return self.peak.total

    def format_table(self) -> str:
        """The busiest process's bytes per component, in binary units, with the settings that decide them."""
        peak = self.peak
        rows = [("statistics", human_bytes(peak.statistics), "training-time sums and one step's buffer"),
                ("factors", human_bytes(peak.factors), f"{self.settings['strategy']} preconditioner"),
                ("queries", human_bytes(peak.queries), f"{self.settings['num_queries']} preconditioned queries"),
                ("score chunk", human_bytes(peak.score_chunk), f"one batch of {self.settings['batch_size']}"),
                ("scores", human_bytes(peak.scores),
                 "kept in the result" if peak.scores is not None else "(give pool_size or keep_top_scores)"),
                ("total", human_bytes(peak.total), "")]
        shown = ", ".join(f"{key}={value}" for key, value in self.settings.items())
        width = max(len(name) for name, _, _ in rows)
        lines = [f"planned memory per process, not run (process {peak.rank} of {len(self.processes)}, "
                 f"{len(self.layers)} tracked layers)", shown]
        lines += [f"  {name:<{width}}  {size:>10}  {note}".rstrip() for name, size, note in rows]
        return "\n".join(lines)

    __str__ = format_table


def human_bytes(count: Optional[int]) -> str:
    """``count`` bytes in binary units (``1.5 GiB``); ``-`` when unknown."""
    if count is None:
        return format_number(None)
    power = 0
    while power < len(BINARY_UNITS) - 1 and count >= 1024 ** (power + 1):
        power += 1
    return f"{count} B" if power == 0 else f"{format_number(count / 1024 ** power, '.3g')} {BINARY_UNITS[power]}"


def load_config(source: Union[str, "os.PathLike[str]"]) -> Any:
    """A Hugging Face configuration from a ``config.json`` (or the directory holding one) or a model
    type (``"gpt2"``, ``"llama"``: that architecture's default configuration). Needs ``transformers``."""
    try:
        import transformers
    except ImportError:
        raise ValueError("planning from a configuration needs transformers (pip install transformers); "
                         "or pass an nn.Module built on the meta device") from None
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"no configuration file at {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise ValueError(f"{path} is not a Hugging Face configuration (it has no 'model_type')")
        return _config_for(transformers, values.pop("model_type"), values)
    return _config_for(transformers, str(source), {})


def _config_for(transformers: Any, model_type: str, values: Dict[str, Any]) -> Any:
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise ValueError(f"{model_type!r} is neither a config.json nor a Hugging Face model type "
                         "(e.g. 'gpt2', 'llama', 'mistral')") from None


def model_on_meta(source: ModelSource) -> nn.Module:
    """The model to plan for: an ``nn.Module`` as it is, otherwise built from its configuration on
    the meta device (shapes without memory) with ``AutoModelForCausalLM.from_config``."""
    if isinstance(source, nn.Module):
        return source
    config = load_config(source) if isinstance(source, (str, os.PathLike)) else source
    import transformers

    if not isinstance(config, transformers.PretrainedConfig):
        raise ValueError(f"expected an nn.Module, a transformers PretrainedConfig, a config.json or a model type, "
                         f"got {type(source).__name__}")
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"cannot build a causal LM from this {type(config).__name__} ({err}); build the model "
                         "yourself under `with torch.device('meta'):` and pass it") from None


def input_groups(layers: Sequence[TrackedLayer]) -> List[List[TrackedLayer]]:
    """Layers that read the same input, in model order: siblings (same parent module) named together in
    :data:`SHARED_INPUT_NAMES` with the same input width; every other layer alone."""
    groups: Dict[Tuple[str, int, int], List[TrackedLayer]] = {}
    for position, layer in enumerate(layers):
        parent, _, leaf = layer.name.rpartition(".")
        kind = next((index for index, names in enumerate(SHARED_INPUT_NAMES) if leaf in names), None)
        key = (parent, kind, layer.d_in) if kind is not None else (layer.name, position, layer.d_in)
        groups.setdefault(key, []).append(layer)
    return list(groups.values())


def _input_carriers(groups: Sequence[Sequence[TrackedLayer]], owners: Optional[Dict[str, Optional[int]]]) -> set:
    """Names of the layers that hold their group's activation covariance: the group's first layer, or,
    when the layers are owned by processes, the first of each process's members (each keeps a copy)."""
    carriers, seen = set(), set()
    for index, group in enumerate(groups):
        for layer in group:
            holder = (index, owners[layer.name] if owners is not None else None)
            if holder not in seen:
                seen.add(holder)
                carriers.add(layer.name)
    return carriers


def _activation_side_bytes(d_in: int, covariance_bytes: int, eigenbasis_bytes: int,
                           strategy: str) -> Tuple[int, int]:
    """``(statistics, factors)`` bytes of one input's activation covariance: the one term that sharing
    an input among layers counts once."""
    statistics = 2 * (d_in * d_in * covariance_bytes + FLOAT64_BYTES)
    factors = approximation(strategy).factor_bytes(0, d_in, eigenbasis_bytes)[0]
    return statistics, factors


def _gradient_side_bytes(d_out: int, d_in: int, covariance_bytes: int, eigenbasis_bytes: int,
                         strategy: str) -> Tuple[int, int]:
    """``(statistics, factors)`` bytes of one layer's own terms: the output-gradient covariance, its
    eigenbasis, and the ``[d_out, d_in]`` float64 eigenvalues (EK-FAC) or Fisher diagonal."""
    statistics = 2 * (d_out * d_out * covariance_bytes + FLOAT64_BYTES)
    factors = approximation(strategy).factor_bytes(d_out, d_in, eigenbasis_bytes)[1]
    return statistics, factors


def _query_bytes(d_out: int, d_in: int, num_queries: int, query_rank: Optional[int], element_bytes: int) -> int:
    """One layer's preconditioned queries: dense, or rank-r factors where they are smaller."""
    if query_rank is not None and query_rank < min(d_out, d_in):
        return num_queries * query_rank * (d_out + d_in) * element_bytes
    return num_queries * d_out * d_in * element_bytes


def _kept_score_bytes(num_queries: int, pool_size: Optional[int], keep_top_scores: Optional[int],
                      num_layers: int) -> Optional[int]:
    """The result's scores: dense ``[Q, N]`` or the top/bottom M with ids and the sketch; plus ``[L, Q]`` sums."""
    layer_sums = num_layers * num_queries * FLOAT64_BYTES
    if keep_top_scores is not None:  # histogram: counts and sums, per sign and bin
        sketch = 2 * keep_top_scores * (SCORE_BYTES + ID_BYTES) + FLOAT64_BYTES * (len(MOMENTS) + 2 * 2 * NUM_BINS)
        return num_queries * sketch + layer_sums
    if pool_size is None:
        return None
    return num_queries * pool_size * SCORE_BYTES + layer_sums


def plan_memory(model: ModelSource, *, world_size: int = 1,
                strategy: str = _default("strategy"),
                shard_factors: bool = _default("shard_factors"),
                shard_statistics: bool = _default("shard_statistics"),
                num_queries: int = _default("num_queries"),
                query_rank: Optional[int] = _default("query_rank"),
                batch_size: int = _default("batch_size"),
                pool_size: Optional[int] = None,
                keep_top_scores: Optional[int] = _default("keep_top_scores"),
                layers: Optional[Sequence[str]] = _default("layers"),
                exclude: Sequence[str] = _default("exclude"),
                covariance_dtype: str = _default("covariance_dtype"),
                eigenbasis_dtype: str = _default("eigenbasis_dtype"),
                ) -> MemoryPlan:
    """Plan the per-process memory of the callback's statistics, factors, queries and scores.

    Args:
        model: an ``nn.Module`` (real or on the meta device), a ``transformers`` ``PretrainedConfig``,
            or a path to a ``config.json`` / a Hugging Face model type (built on the meta device).
        world_size: number of processes (DDP / FSDP ranks).
        strategy, shard_factors, shard_statistics: the callback's settings (defaults and validation of
            :class:`~lightning_influence.InfluenceConfig`), as are the next three entries.
        num_queries, query_rank, batch_size, keep_top_scores: the scoring settings.
        layers, exclude: the tracked layers, selected as the callback selects them.
        covariance_dtype, eigenbasis_dtype: dtypes of the statistics and of the stored eigenbases.
        pool_size: training examples scored (the pool, or ``max_train_examples``); needed for the
            dense scores (``keep_top_scores=None``).

    Returns:
        A :class:`MemoryPlan`: bytes per process and component, and per layer.
    """
    curvature = CurvatureConfig(strategy=strategy, shard_factors=shard_factors, shard_statistics=shard_statistics,
                                layers=layers, exclude=exclude, covariance_dtype=covariance_dtype,
                                eigenbasis_dtype=eigenbasis_dtype)
    scoring = ScoringConfig(query_rank=query_rank, batch_size=batch_size, keep_top_scores=keep_top_scores)
    InfluenceConfig(task="classification", num_queries=num_queries, curvature=curvature, scoring=scoring).validate()
    for name, value in (("world_size", world_size), ("pool_size", pool_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tracked = select_layers(model_on_meta(model), layers, exclude or ())
    owners = distributed.assign_owners(
        {layer.name: distributed.factor_cost(layer.d_out, layer.d_in) for layer in tracked}, world_size) \
        if shard_factors else {layer.name: None for layer in tracked}
    covariance_bytes = getattr(torch, covariance_dtype).itemsize
    eigenbasis_bytes = getattr(torch, eigenbasis_dtype).itemsize
    groups = input_groups(tracked)
    carries_statistics = _input_carriers(groups, owners if shard_statistics else None)
    carries_factors = _input_carriers(groups, owners if shard_factors else None)
    per_layer = []
    for layer in tracked:
        statistics, factors = _gradient_side_bytes(layer.d_out, layer.d_in, covariance_bytes, eigenbasis_bytes,
                                                   strategy)
        input_statistics, input_factors = _activation_side_bytes(layer.d_in, covariance_bytes, eigenbasis_bytes,
                                                                 strategy)
        statistics += input_statistics if layer.name in carries_statistics else 0
        factors += input_factors if layer.name in carries_factors else 0
        queries = _query_bytes(layer.d_out, layer.d_in, num_queries, query_rank, layer.module.weight.element_size())
        per_layer.append(LayerMemory(layer.name, layer.d_out, layer.d_in, owners[layer.name], statistics, factors,
                                     queries))
    queries = sum(layer.queries for layer in per_layer)
    score_chunk = (len(tracked) + 1) * num_queries * batch_size * SCORE_BYTES
    scores = _kept_score_bytes(num_queries, pool_size, keep_top_scores, len(tracked))

    def held(rank: int, sharded: bool, part: str) -> int:
        return sum(getattr(layer, part) for layer in per_layer if not sharded or layer.owner == rank)

    processes = [ProcessMemory(rank, held(rank, shard_statistics, "statistics"), held(rank, shard_factors, "factors"),
                               queries, score_chunk, scores) for rank in range(world_size)]
    settings = {"world_size": world_size, "strategy": strategy, "shard_factors": shard_factors,
                "shard_statistics": shard_statistics, "num_queries": num_queries,
                "query_rank": query_rank, "batch_size": batch_size, "pool_size": pool_size,
                "keep_top_scores": keep_top_scores, "covariance_dtype": covariance_dtype,
                "eigenbasis_dtype": eigenbasis_dtype}
    return MemoryPlan(settings, per_layer, processes)
