"""The engine's own passes under the training precision's autocast (bf16 / fp16 mixed precision):
forwards in half precision, everything accumulated, rotated and contracted in float32, and scores
within a stated tolerance of the float32 passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

import lightning_influence as li
from lightning_influence.engine import statistics as statistics_module
from lightning_influence.engine import passes
from lightning_influence.engine import scoring
from lightning_influence.engine.curvature_passes import accumulate_covariances
from lightning_influence.checkpoint.session import InfluenceSession
from tests.callback_models import planted_data
from tests.reliability_helpers import fit, make_callback

# Measured on CPU (torch.autocast("cpu", torch.bfloat16)): the MLP below 0.27% max relative error,
# Spearman >= 0.9997; a 2-block GPT-2 (width 32) 0.44%, Spearman >= 0.9992. The stated tolerance
# leaves room for other platforms' bf16 kernels.
MAX_RELATIVE_ERROR = 2e-2  # max |score_bf16 - score_fp32| / max |score_fp32|, per result
MIN_SPEARMAN = 0.99  # rank correlation of each query's scores over the pool


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def trained_classifier():
    torch.manual_seed(0)
    train, val, planted = planted_data()
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        for x, y in DataLoader(train, batch_size=8):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model, train, Subset(val, range(4)), planted


def session_scores(model, task, train, queries, autocast):
    statistics = accumulate_covariances(model, task, DataLoader(train, batch_size=16), li.select_layers(model),
                                        fisher="empirical")
    session = InfluenceSession(task, train, queries, scoring=dict(top_k=3, batch_size=16, self_influence=True),
                               autocast=autocast)
    result, _ = session.compute(model, statistics, step=0)
    return result


def assert_within_tolerance(reference, mixed):
    scale = float(reference.scores.abs().max())
    assert float((reference.scores - mixed.scores).abs().max()) <= MAX_RELATIVE_ERROR * scale
    for q in range(reference.scores.shape[0]):
        assert spearman(reference.scores[q], mixed.scores[q]) >= MIN_SPEARMAN
    assert torch.equal(reference.scores.argmax(1), mixed.scores.argmax(1))
    self_scale = float(reference.self_scores.abs().max())
    assert float((reference.self_scores - mixed.self_scores).abs().max()) <= MAX_RELATIVE_ERROR * self_scale
    assert spearman(reference.self_scores, mixed.self_scores) >= MIN_SPEARMAN


def test_bf16_autocast_scores_match_float32_on_a_classifier():
    model, train, queries, planted = trained_classifier()
    task = li.ClassificationTask()
    reference = session_scores(model, task, train, queries, None)
    mixed = session_scores(model, task, train, queries, torch.bfloat16)
    assert not torch.equal(reference.scores, mixed.scores)  # the passes did run in bf16
    assert_within_tolerance(reference, mixed)
    assert int(mixed.top_k(1).indices[0, 0]) == planted
    assert mixed.scores.dtype == torch.float32


def test_bf16_autocast_scores_match_float32_on_a_tiny_gpt2():
    hf_models = pytest.importorskip("tests.hf_models")
    model = hf_models.tiny_gpt2()
    ids = torch.randint(1, hf_models.VOCAB, (14, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    task = li.CausalLMTask()
    reference = session_scores(model, task, data[:12], data[12:], None)
    mixed = session_scores(model, task, data[:12], data[12:], torch.bfloat16)
    assert not torch.equal(reference.scores, mixed.scores)
    assert_within_tolerance(reference, mixed)


def test_forwards_run_in_bf16_while_statistics_and_contractions_stay_float32(monkeypatch):
    """Spies on the layer outputs (bf16: autocast is on) and on what reaches the eigenvalue
    correction and the contraction with the queries (float32)."""
    model, train, queries, _ = trained_classifier()
    output_dtypes, handed_over = set(), set()

    def spy(original):
        def wrapper(self_or_first, *args, **kwargs):
            handed_over.update(arg.dtype for arg in args if isinstance(arg, torch.Tensor))
            return original(self_or_first, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(statistics_module.EigenvalueCorrection, "add",
                        spy(statistics_module.EigenvalueCorrection.add))
    monkeypatch.setattr(scoring, "contract", spy(scoring.contract))
    task = li.ClassificationTask()
    statistics = accumulate_covariances(model, task, DataLoader(train, batch_size=16), li.select_layers(model),
                                        fisher="empirical")
    model[2].register_forward_hook(lambda module, inputs, output: output_dtypes.add(output.dtype))
    session = InfluenceSession(task, train, queries, scoring={"top_k": 0, "batch_size": 16}, autocast=torch.bfloat16)
    _, fitted = session.compute(model, statistics, step=0)
    assert output_dtypes == {torch.bfloat16}
    assert handed_over == {torch.float32}
    for name in fitted.layer_names:
        assert fitted.layers[name]["eigenvalues"].dtype in (torch.float32, torch.float64)
        assert all(basis.dtype == torch.float64 for basis in fitted.eigenbasis(name))
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.is_autocast_enabled("cpu")


def test_offline_functions_run_under_mixed_precision_and_without_it_in_float32():
    model, train, queries, _ = trained_classifier()
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    task = li.ClassificationTask()
    fitted = li.fit_factors(model, task, train, fisher="empirical", batch_size=32)
    assert set(seen) == {torch.float32}
    seen.clear()
    with passes.mixed_precision(torch.bfloat16):
        mixed = li.compute_influence(model, task, train, queries, fitted, batch_size=32)
    assert set(seen) == {torch.bfloat16} and mixed.scores.dtype == torch.float32
    reference = li.compute_influence(model, task, train, queries, fitted, batch_size=32)
    assert float((reference.scores - mixed.scores).abs().max()) <= MAX_RELATIVE_ERROR * float(
        reference.scores.abs().max())


def test_precision_settings_map_to_autocast_dtypes():
    assert passes.autocast_dtype("bf16-mixed") == torch.bfloat16
    assert passes.autocast_dtype("16-mixed") == torch.float16
    assert passes.autocast_dtype("32-true") is None and passes.autocast_dtype("bf16-true") is None
    with pytest.raises(ValueError, match="torch.bfloat16, torch.float16 or None"):
        InfluenceSession(li.ClassificationTask(), [0], [0], autocast=torch.float32)


def test_callback_passes_use_the_trainers_bf16_autocast(tmp_path, monkeypatch):
    """Trainer(precision="bf16-mixed"): the callback's session runs its forwards under bf16
    autocast, its statistics are float32, and the planted near-copy still ranks first."""
    train, val, planted = planted_data()
    cb = make_callback(tmp_path, every_n_epochs=None, on_checkpoint=False, on_train_end=True)
    inside_engine = []
    original = passes.forward

    def recording_forward(model, task, batch, tracker):
        with passes.autocast_forward(model):
            inside_engine.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(model, task, batch, tracker)

    monkeypatch.setattr(passes, "forward", recording_forward)
    fit(tmp_path, cb, max_epochs=4, precision="bf16-mixed")
    assert cb._loop.session.autocast == torch.bfloat16
    assert inside_engine and set(inside_engine) == {torch.bfloat16}
    assert all(parts["a_sum"].dtype == torch.float32 for parts in cb.statistics.state.values())
    (result,) = cb.results
    assert torch.isfinite(result.scores).all() and int(result.top_k(1).indices[0, 0]) == planted


def test_integrations_read_their_mixed_precision_setting():
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from lightning_influence.loops.hf import _autocast_dtype

    assert _autocast_dtype(SimpleNamespace(bf16=True, fp16=False)) == torch.bfloat16
    assert _autocast_dtype(SimpleNamespace(bf16=False, fp16=True)) == torch.float16
    assert _autocast_dtype(SimpleNamespace(bf16=False, fp16=False)) is None


def test_fabric_monitor_uses_fabrics_bf16_autocast(tmp_path):
    fabric_module = pytest.importorskip("lightning.fabric")
    from lightning_influence.loops.fabric import InfluenceMonitor

    model, train, queries, _ = trained_classifier()
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    monitor = InfluenceMonitor(fabric, fabric.setup_module(model), "classification", train, queries,
                               output_dir=tmp_path, report=dict(show_progress=False))
    assert monitor.session.autocast == torch.bfloat16
    monitor.close()
