"""The memory planner's bytes equal what the engine really holds on small configurations: the
statistics after training steps, fitted factors (EK-FAC, K-FAC), each process's share under
sharding, the preconditioned queries, one streamed score chunk and the kept scores."""

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.engine import distributed
from lightning_influence.cli import main
from lightning_influence.engine.memory_plan import human_bytes, input_groups, model_on_meta
from lightning_influence.engine.queries import precondition_queries
from lightning_influence.engine.sharding import owners_of
from lightning_influence.analysis.sketch import SKETCH_FIELDS

from tests.hf_models import loader, tiny_gpt2, tiny_llama, token_examples
from tests.tiny_models import train_recorded

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on one thread: a second one only spins on a busy machine (50x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


def mlp_data(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 6, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (count,), generator=generator))


CASES = {  # model factory, task, training batches, loss reduction
    "mlp": (tiny_mlp, li.ClassificationTask, lambda: torch.utils.data.DataLoader(mlp_data(16), batch_size=8), "mean"),
    "gpt2": (tiny_gpt2, li.CausalLMTask, lambda: loader(token_examples(8, seed=0), batch_size=4), "token_mean"),
    "llama": (tiny_llama, li.CausalLMTask, lambda: loader(token_examples(8, seed=0), batch_size=4), "token_mean"),
}


def train_statistics(model, task, batches, reduction, shard=False):
    """Two real training steps recorded by ``StepStatistics``, as the callback records them."""
    statistics = li.StepStatistics(li.select_layers(model), task, loss_reduction=reduction, shard=shard)
    statistics.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_recorded(statistics, batches,
                   lambda batch: task.loss(model, batch).mean() if reduction == "mean" else model(**batch).loss,
                   optimizer)
    statistics.detach()
    assert float(statistics.steps_committed) == 2
    return statistics


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def factor_bytes(factors, names):
    return tensor_bytes([t for name in names for t in factors.layers[name].values()])


@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_equal_what_training_steps_hold(case):
    make, task_class, batches, reduction = CASES[case]
    model = make()
    held = train_statistics(model, task_class(), batches(), reduction).held_bytes()
    assert li.plan_memory(model).statistics == held
    assert li.plan_memory(model, covariance_dtype="float64").statistics > held


@pytest.fixture(scope="module")
def gpt2_fitted():
    """A tiny GPT-2, its queries and pool, and EK-FAC / K-FAC factors fitted on the pool."""
    model, task = tiny_gpt2(), li.CausalLMTask()
    pool, queries = token_examples(8, seed=1), token_examples(2, seed=2)
    factors = {strategy: li.fit_factors(model, task, loader(pool, 4), strategy=strategy, fisher="empirical")
               for strategy in ("ekfac", "kfac")}
    return model, task, pool, queries, factors


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_factors_equal_the_fitted_tensors(gpt2_fitted, strategy):
    model, _, _, _, factors = gpt2_fitted
    assert li.plan_memory(model, strategy=strategy).factors == factors[strategy].held_bytes()


@pytest.mark.parametrize("strategy, eigenbasis_dtype", [("ekfac", "float64"), ("ekfac", "float32"),
                                                        ("kfac", "bfloat16"), ("diagonal", "float64")])
def test_mlp_factors_count_the_bias_column_and_dtypes(strategy, eigenbasis_dtype):
    model = tiny_mlp()
    fitted = li.fit_factors(model, li.ClassificationTask(), mlp_data(16), strategy=strategy, fisher="empirical",
                            eigenbasis_dtype=getattr(torch, eigenbasis_dtype))
    if strategy != "diagonal":
        assert fitted.layers["0"]["q_a"].shape == (7, 7)  # 6 inputs and the bias
    assert li.plan_memory(model, strategy=strategy, eigenbasis_dtype=eigenbasis_dtype).factors == fitted.held_bytes()


def test_each_process_holds_its_owned_layers(gpt2_fitted, monkeypatch):
    """With ``shard_factors`` and ``shard_statistics`` on 2 processes, process r holds exactly the
    statistics ``StepStatistics(shard=True)`` accumulates there and the factors of the layers the
    engine assigns it (``owners_of`` under a world of 2)."""
    model, task, _, _, factors = gpt2_fitted
    sharded = li.plan_memory(model, world_size=2, shard_factors=True, shard_statistics=True)
    factors_only = li.plan_memory(model, world_size=2, shard_factors=True)
    replicated = li.plan_memory(model)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        owners = owners_of(li.select_layers(model))
        mine = [name for name, owner in owners.items() if owner == rank]
        held = train_statistics(tiny_gpt2(), task, loader(token_examples(8, seed=0), 4), "token_mean", shard=True)
        assert sharded.processes[rank].statistics == held.held_bytes()
        assert sharded.processes[rank].factors == factor_bytes(factors["ekfac"], mine)
        assert factors_only.processes[rank].statistics == replicated.statistics
        assert factors_only.processes[rank].factors == factor_bytes(factors["ekfac"], mine)
    assert 0 < sharded.statistics < replicated.statistics
    assert sum(p.factors for p in sharded.processes) == replicated.factors


def test_a_shared_input_split_across_processes_is_held_by_each(monkeypatch):
    """A group of layers reading one input whose members have different owners: each owner keeps its
    own copy of the activation covariance, as ``StepStatistics(shard=True)`` does."""
    make, task_class, batches, reduction = CASES["llama"]
    plan = li.plan_memory(make(), world_size=2, shard_factors=True, shard_statistics=True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    split = 0
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        model = make()
        owners = owners_of(li.select_layers(model))
        split += sum(len({owners[layer.name] for layer in group}) > 1 for group in input_groups(li.select_layers(model)))
        assert plan.processes[rank].statistics == train_statistics(model, task_class(), batches(), reduction,
                                                                   shard=True).held_bytes()
    assert split > 0, "no group was split across the two processes: the case is not exercised"


@pytest.mark.parametrize("query_rank", [None, 4, 32])  # 32: dense where min(d_out, d_in) is 32, factored at 33
def test_queries_equal_the_preconditioned_tensors(gpt2_fitted, query_rank):
    model, task, _, queries, factors = gpt2_fitted
    fitted = factors["ekfac"]
    layers = li.select_layers(model)
    prepared, _ = precondition_queries(model, task, loader(queries, 2), fitted, layers,
                                       fitted.damping_per_layer(None), query_rank)
    held = tensor_bytes(list(prepared.dense.values()) + [t for pair in prepared.low_rank.values() for t in pair])
    assert bool(prepared.low_rank) == (query_rank is not None)
    plan = li.plan_memory(model, num_queries=len(queries), query_rank=query_rank)
    assert plan.queries == held


def test_score_chunk_and_kept_scores_equal_the_result(gpt2_fitted):
    model, task, pool, queries, factors = gpt2_fitted
    one_batch = li.compute_influence(model, task, loader(pool[:4], 4), loader(queries, 4), factors["ekfac"],
                                     per_layer=True, batch_size=4)
    chunk = li.plan_memory(model, num_queries=len(queries), batch_size=4).score_chunk
    assert chunk == tensor_bytes([one_batch.layer_scores, one_batch.scores])

    dense = li.compute_influence(model, task, loader(pool, 4), loader(queries, 4), factors["ekfac"], layer_sums=True)
    planned = li.plan_memory(model, num_queries=len(queries), pool_size=len(pool)).scores
    assert planned == tensor_bytes([dense.scores, dense.get("layer_abs_sums")])

    kept = li.compute_influence(model, task, loader(pool * 2, 4), loader(queries, 4), factors["ekfac"], layer_sums=True,
                                keep_top=10)
    planned = li.plan_memory(model, num_queries=len(queries), keep_top_scores=10).scores
    assert planned == tensor_bytes([kept.get(name) for name in SKETCH_FIELDS + ("layer_abs_sums",)])


def test_a_configuration_is_planned_on_the_meta_device_without_weights():
    config = tiny_gpt2().config
    built = model_on_meta(config)
    assert all(parameter.is_meta for parameter in built.parameters())
    from_config, from_model = li.plan_memory(config), li.plan_memory(tiny_gpt2())
    assert from_config.layers == from_model.layers and from_config.processes == from_model.processes


def test_shared_inputs_count_one_activation_covariance_per_group():
    model = tiny_llama()
    groups = [[layer.name.rpartition(".")[2] for layer in group] for group in input_groups(li.select_layers(model))
              if len(group) > 1]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    hidden, blocks = model.config.hidden_size, model.config.num_hidden_layers
    unshared = sum(2 * (layer.d_in ** 2 + layer.d_out ** 2) * 4 + 4 * 8 for layer in li.select_layers(model))
    saved_per_block = 3 * 2 * (hidden * hidden * 4 + 8)  # two of q/k/v's and one of gate/up's, sums and counts
    assert unshared - li.plan_memory(model).statistics == blocks * saved_per_block


def test_cli_plans_a_config_json(tmp_path, capsys):
    tiny_gpt2().config.to_json_file(tmp_path / "config.json")
    code = main(["plan", str(tmp_path / "config.json"), "--world-size", "2", "--shard-factors", "--shard-statistics",
                 "--query-rank", "4", "--pool-size", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = li.plan_memory(tiny_gpt2(), world_size=2, shard_factors=True, shard_statistics=True, query_rank=4,
                          pool_size=100)
    rows = dict(re.findall(r"^  (statistics|factors|queries|total)\s+(\S+ \S+)", out, flags=re.M))
    assert rows == {"statistics": human_bytes(plan.statistics), "factors": human_bytes(plan.factors),
                    "queries": human_bytes(plan.queries), "total": human_bytes(plan.total)}
    assert "not run" in out


@pytest.mark.parametrize("argv, code, fragment", [
    (["plan", "gpt2", "--shard-statistics"], 1, "curvature.shard_statistics needs curvature.shard_factors=True"),
    (["plan", "not-a-model-type"], 1, "neither a config.json nor a Hugging Face model type"),
    (["plan", "missing/config.json"], 1, "no configuration file"),
    (["plan", "gpt2", "--set", "n_layers=2"], 1, "--set n_layers: GPT2Config has no such setting"),
    (["plan", "gpt2", "--world-size", "0"], 2, "expected a positive integer"),
])
def test_cli_refuses_bad_plans_in_one_line(capsys, argv, code, fragment):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_benchmark_script_labels_its_plans(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_plan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    payload = memory_plan.main(["--quick", "--json", str(tmp_path / "out.json"), "--markdown", str(tmp_path / "out.md")])
    assert payload["planned_not_run"] and "(planned, not run)" in (tmp_path / "out.md").read_text()
    sharded = {p["world_size"]: p["statistics"] for p in payload["plans"] if p["layout"] == "sharded"}
    assert sharded[64] < sharded[8]


def test_readme_table_is_the_benchmark_output():
    readme = (ROOT / "README.md").read_text()
    table = (ROOT / "benchmarks" / "results" / "memory_plan.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| Llama") or line.startswith("| GPT-2")]
    assert rows and all(row in table for row in rows)
