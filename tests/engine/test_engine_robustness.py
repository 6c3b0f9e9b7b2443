"""Engine robustness: bad examples, zero curvature, batch layouts and layers that cannot be tracked."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import UserDict

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import lightning_influence as li
from lightning_influence.engine import passes
from lightning_influence.engine.curvature_passes import accumulate_covariances
from lightning_influence.analysis import layer_shares
from lightning_influence.results import finite_topk
from tests.tiny_models import TinyTransformer, TokenData, classification_data, mlp, regression_data


def _poisoned(data: TensorDataset, bad: dict) -> TensorDataset:
    """A copy of ``data`` whose inputs at the given positions are overwritten with a value."""
    x = data.tensors[0].clone()
    for position, value in bad.items():
        x[position] = value
    return TensorDataset(x, *data.tensors[1:])


def _clean_positions(n: int, bad) -> list:
    return [i for i in range(n) if i not in bad]


# -- 1. one bad example must not poison everything -----------------------------------------------

@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_nonfinite_examples_are_kept_out_of_the_factors(strategy):
    torch.manual_seed(0)
    model, task, clean = mlp(), li.ClassificationTask(), classification_data(n=24)
    bad = {3: math.nan, 9: 1e30, 17: math.inf}  # 1e30 is finite in float64 but its square overflows float32
    data = _poisoned(clean, bad)
    with pytest.warns(UserWarning, match=r"3 example\(s\).*non-finite.*\[3, 9, 17\]"):
        factors = li.fit_factors(model, task, data, strategy, fisher="empirical", batch_size=8)
    assert factors.meta["nonfinite_examples"] == 3
    expected = li.fit_factors(model, task, Subset(clean, _clean_positions(24, bad)), strategy,
                              fisher="empirical", batch_size=8)
    assert expected.meta["nonfinite_examples"] == 0
    for name in factors.layer_names:
        for key, value in factors.layers[name].items():
            assert torch.isfinite(value).all(), (name, key)
        torch.testing.assert_close(factors.eigenvalues(name), expected.eigenvalues(name))


def test_nonfinite_examples_with_the_true_fisher_and_then_finite_scores():
    model, task, clean = mlp(), li.ClassificationTask(), classification_data(n=24)
    data = _poisoned(clean, {5: math.nan})
    with pytest.warns(UserWarning, match=r"1 example\(s\).*\[5\]"):
        factors = li.fit_factors(model, task, data)  # true Fisher: sampling from NaN logits must not crash
    assert factors.meta["nonfinite_examples"] == 1
    result = li.compute_influence(model, task, clean, Subset(clean, range(3)), factors=factors)
    assert torch.isfinite(result.scores).all()


def test_the_session_names_a_nonfinite_example_by_its_dataset_index_in_every_warning():
    """The correction pass reads a seeded shuffle of the pool: its warning used to name the
    example's position in that order (27), while scoring named its dataset index (7)."""
    torch.manual_seed(0)
    model, task, clean = mlp(), li.ClassificationTask(), classification_data(n=40)
    session = li.InfluenceSession(task, _poisoned(clean, {7: math.nan}), Subset(clean, range(3)),
                                  curvature=dict(fisher="empirical", correction_batches=None),
                                  scoring=dict(batch_size=8, top_k=2))
    assert session.correction_ids().tolist().index(7) != 7  # shuffled: position and index differ
    layers = li.select_layers(model)
    statistics = accumulate_covariances(model, task, clean, layers, fisher="empirical")
    with pytest.warns(UserWarning, match=r"1 example\(s\) with non-finite values.*their dataset indices: \[7\]"):
        factors = session.fit_factors(model, statistics)
    with pytest.warns(UserWarning, match=r"1 training example\(s\).*ids \[7\]"):
        result = session.score(model, factors)
    assert result.meta["nonfinite_train_ids"] == [7]


def test_nonfinite_training_examples_get_nan_scores_and_are_never_ranked():
    model, task, clean = mlp(), li.ClassificationTask(), classification_data(n=20)
    factors = li.fit_factors(model, task, clean, fisher="empirical")
    bad = {4: math.nan, 11: math.inf}
    data = _poisoned(clean, bad)
    queries = Subset(clean, range(3))
    with pytest.warns(UserWarning, match=r"2 training example\(s\).*non-finite.*\[4, 11\]"):
        result = li.compute_influence(model, task, data, queries, factors=factors, per_layer=True,
                                      self_influence=True)
    reference = li.compute_influence(model, task, clean, queries, factors=factors, per_layer=True,
                                     self_influence=True)
    assert result.meta["nonfinite_train_ids"] == [4, 11]
    assert result.meta["nonfinite_query_ids"] == []
    good = _clean_positions(20, bad)
    assert torch.isnan(result.scores[:, [4, 11]]).all()
    assert torch.isnan(result.layer_scores[:, :, [4, 11]]).all()
    assert torch.isnan(result.self_scores[[4, 11]]).all()
    torch.testing.assert_close(result.scores[:, good], reference.scores[:, good])
    torch.testing.assert_close(result.layer_scores[:, :, good], reference.layer_scores[:, :, good])
    for largest in (True, False):
        top = result.top_k(20, largest=largest)
        assert not set(top.indices[:, :18].flatten().tolist()) & set(bad)
        assert (top.indices[:, 18:] == -1).all()
        assert torch.isfinite(top.values[:, :18]).all()


def test_nonfinite_token_scores_are_nan_for_the_bad_example_only():
    model, task = TinyTransformer(vocab=6).double(), li.CausalLMTask()
    clean = TokenData(n=8, length=5)
    factors = li.fit_factors(model, task, clean, fisher="empirical", batch_size=4)
    with torch.no_grad():
        model.embed.weight[5] = math.nan  # a token only sequence 2 contains
    data = [clean[i] for i in range(len(clean))]
    data[2]["input_ids"] = data[2]["input_ids"].clone()
    data[2]["input_ids"][1] = 5  # position 1 is never padding
    queries = [clean[i] for i in range(2)]
    with pytest.warns(UserWarning, match=r"1 training example\(s\).*\[2\]"):
        result = li.compute_influence(model, task, data, queries, factors=factors, per_token=True)
    assert result.meta["nonfinite_train_ids"] == [2]
    good = _clean_positions(8, [2])
    assert torch.isnan(result.token_scores[:, 2]).all() and torch.isnan(result.scores[:, 2]).all()
    assert torch.isfinite(result.token_scores[:, good]).all() and torch.isfinite(result.scores[:, good]).all()


def test_nonfinite_query_gets_a_nan_row_and_does_not_flag_training_examples():
    model, task, clean = mlp(), li.ClassificationTask(), classification_data(n=12)
    factors = li.fit_factors(model, task, clean, fisher="empirical")
    queries = _poisoned(TensorDataset(*[t[:3] for t in clean.tensors]), {1: math.nan})
    with pytest.warns(UserWarning, match=r"1 quer.*\[1\]"):
        result = li.compute_influence(model, task, clean, queries, factors=factors, query_rank=2)
    assert result.meta["nonfinite_query_ids"] == [1]
    assert result.meta["nonfinite_train_ids"] == []
    assert torch.isnan(result.scores[1]).all()
    assert torch.isfinite(result.scores[[0, 2]]).all()


def test_finite_topk_ranks_no_nan_or_inf_and_pads_short_rows():
    scores = torch.tensor([[0.5, math.nan, 2.0, -1.0],
                           [math.nan, math.inf, 1.0, -math.inf]])
    top = finite_topk(scores, 3)
    assert top.indices.tolist() == [[2, 0, 3], [2, -1, -1]]
    assert top.values[0].tolist() == [2.0, 0.5, -1.0]
    assert top.values[1, 0] == 1.0 and (top.values[1, 1:] == -math.inf).all()
    bottom = finite_topk(scores, 3, largest=False)
    assert bottom.indices.tolist() == [[3, 0, 2], [2, -1, -1]]
    assert (bottom.values[1, 1:] == math.inf).all()
    assert finite_topk(scores, 10).indices.shape == (2, 4)
    result = li.InfluenceResult(scores=scores, train_ids=torch.tensor([10, 11, 12, 13]))
    assert result.top_k(2).indices.tolist() == [[12, 10], [12, -1]]


def test_layer_shares_ignore_nan_examples():
    layer_scores = torch.tensor([[[1.0, 2.0, math.nan]], [[3.0, 2.0, math.nan]]])  # [L=2, Q=1, N=3]
    shares = layer_shares(layer_scores)
    torch.testing.assert_close(shares, layer_shares(layer_scores[:, :, :2]))
    top = layer_shares(layer_scores, top_k=1)
    torch.testing.assert_close(top, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


# -- 2. zero curvature and damping ------------------------------------------------------------------

class _LoraStyle(nn.Module):
    """A frozen base layer plus a low-rank adapter ``B A`` with ``B = 0``, as LoRA initialises it."""

    def __init__(self, d_in: int = 6, rank: int = 2, d_hidden: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_hidden).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_hidden, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.head = nn.Linear(d_hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.lora_B(self.lora_A(x))))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_zero_curvature_layer_gets_a_positive_damping_and_finite_scores(strategy):
    model, task, data = _LoraStyle().double(), li.ClassificationTask(), classification_data(n=16)
    factors = li.fit_factors(model, task, data, strategy, fisher="empirical")
    assert float(factors.eigenvalues("lora_A").abs().max()) == 0.0
    lambdas = factors.damping_per_layer()
    assert all(value > 0 for value in lambdas.values())
    result = li.compute_influence(model, task, data, Subset(data, range(3)), factors=factors, per_layer=True,
                                  self_influence=True)
    assert torch.isfinite(result.scores).all() and torch.isfinite(result.self_scores).all()
    assert result.meta["damping"] == lambdas
    # The floor only lifts the zero layer: the others keep the paper's heuristic.
    assert lambdas["head"] == pytest.approx(0.1 * float(factors.eigenvalues("head").mean()))
    assert torch.isfinite(li.compute_self_influence(model, task, data, factors)).all()


def test_absolute_zero_damping_on_a_zero_curvature_layer_is_refused():
    model, task, data = _LoraStyle().double(), li.ClassificationTask(), classification_data(n=16)
    factors = li.fit_factors(model, task, data, fisher="empirical")
    with pytest.raises(ValueError, match="damping 0 .*lora_A.*zero eigenvalue"):
        li.compute_influence(model, task, data, Subset(data, range(2)), factors=factors, damping=0.0)
    with pytest.raises(ValueError, match="lora_A"):
        factors.damping_per_layer({"lora_A": 0.0, "lora_B": 1.0, "head": 1.0})


def test_peft_lora_adapter_at_initialisation_gives_finite_scores():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = peft.get_peft_model(Net().double(), peft.LoraConfig(r=2, target_modules=["fc"], lora_dropout=0.0))
    data = classification_data(n=16)
    result = li.compute_influence(model, li.ClassificationTask(), data, Subset(data, range(2)))
    assert any("lora_A" in name for name in result.layer_names)
    assert torch.isfinite(result.scores).all()


@pytest.mark.parametrize("damping", [math.inf, 1e300, math.nan, -1.0, {"0": 1.0}])
def test_damping_must_be_finite_non_negative_and_cover_every_layer(damping):
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=8)
    factors = li.fit_factors(model, task, data, fisher="empirical")
    with pytest.raises(ValueError, match="damping"):
        li.compute_influence(model, task, data, Subset(data, range(2)), factors=factors, damping=damping)
    with pytest.raises(ValueError, match="damping"):
        factors.damping("0", damping)


@pytest.mark.parametrize("damping", [1e35, -1e-9])
def test_one_damping_check_for_the_callback_compute_influence_and_the_command_line(damping, capsys):
    """Damping was checked in three places with two upper bounds (1e30 and float32's 3.4e38)."""
    from lightning_influence.cli import build_parser

    expected = (f"damping must be a number from 0 to 1e+30 (above, it is effectively infinite: every score shrinks "
                f"towards zero), or None for the per-layer heuristic; got {damping!r}")
    with pytest.raises(ValueError) as config:
        li.InfluenceConfig(task="classification", curvature=li.CurvatureConfig(damping=damping)).validate()
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=8)
    factors = li.fit_factors(model, task, data, fisher="empirical")
    with pytest.raises(ValueError) as offline:
        li.compute_influence(model, task, data, Subset(data, range(2)), factors=factors, damping=damping)
    assert str(config.value) == f"curvature.{expected}" and str(offline.value) == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--checkpoint", "c", "--model", "m:M", "--train-data", "d:t",
                                   "--query-data", "d:q", "--factors", "f", "--task", "classification",
                                   "--out", "o", f"--damping={damping}"])
    assert expected in " ".join(capsys.readouterr().err.split())


def test_damping_per_layer_matches_the_heuristic_where_no_floor_applies():
    model, task, data = mlp(), li.ClassificationTask(), classification_data(n=16)
    factors = li.fit_factors(model, task, data)
    lambdas = factors.damping_per_layer()
    for name in factors.layer_names:
        assert lambdas[name] == pytest.approx(0.1 * float(factors.eigenvalues(name).mean()))
    assert factors.damping_per_layer(0.5) == {name: 0.5 for name in factors.layer_names}


# -- 3. batches of any container type reach the device ---------------------------------------------

class _Encoding(UserDict):
    """Like transformers' BatchEncoding: a UserDict holding the batch's tensors."""


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor


class _Movable:
    """An object that knows how to move itself (a ``.to`` method)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def to(self, device, non_blocking: bool = False):
        return _Movable(self.value.to(device))


def test_to_device_moves_mappings_dataclasses_and_objects_with_to():
    meta = torch.device("meta")
    moved = passes.to_device(_Encoding(input_ids=torch.ones(2, 3)), meta)
    assert type(moved) is _Encoding and moved["input_ids"].is_meta
    moved = passes.to_device({"batch": _Batch(torch.ones(2), torch.zeros(2))}, meta)
    assert isinstance(moved["batch"], _Batch) and moved["batch"].x.is_meta and moved["batch"].y.is_meta
    assert passes.to_device([_Movable(torch.ones(1))], meta)[0].value.is_meta
    assert passes.to_device(("text", 3), meta) == ("text", 3)


def test_to_device_moves_a_transformers_batch_encoding():
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    moved = passes.to_device(encoding, torch.device("meta"))
    assert isinstance(moved, transformers.BatchEncoding) and moved["input_ids"].is_meta


# -- 4. nn.MultiheadAttention's out_proj -------------------------------------------------------------

class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_multihead_attention_out_proj_is_left_out_with_one_warning():
    torch.manual_seed(0)
    model = _Encoder().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [layer.name for layer in li.select_layers(model)]
    assert "encoder.self_attn.out_proj" not in names
    assert {"encoder.linear1", "encoder.linear2", "head"} <= set(names)
    about = [w for w in caught if str(w.message).startswith("not tracking")]
    assert len(about) == 1 and "encoder.self_attn.out_proj" in str(about[0].message)
    data = TensorDataset(torch.randn(10, 3, 8, dtype=torch.float64), torch.randint(0, 3, (10,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = li.compute_influence(model, li.ClassificationTask(), data, Subset(data, range(2)))
    assert torch.isfinite(result.scores).all() and "encoder.self_attn.out_proj" not in result.layer_names


def test_naming_multihead_attention_out_proj_is_refused():
    with pytest.raises(li.TrackingError, match="encoder.self_attn.out_proj.*MultiheadAttention"):
        li.select_layers(_Encoder(), layers=["encoder.self_attn.out_proj", "head"])


# -- 5. dict batches for classification and regression -----------------------------------------------

class _DictData(Dataset):
    def __init__(self, data: TensorDataset, input_key: str, label_key: str) -> None:
        self.data, self.input_key, self.label_key = data, input_key, label_key

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return {self.input_key: x, self.label_key: y}


class _PixelModel(nn.Module):
    """A model with a Hugging Face-style keyword signature around ``net``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net(pixel_values)


@pytest.mark.parametrize("task_class, data, model", [
    (li.ClassificationTask, classification_data(n=12), mlp()),
    (li.RegressionTask, regression_data(n=12, d_in=6, d_out=3), mlp(d_out=3)),
])
def test_dict_batches_score_like_tuple_batches(task_class, data, model):
    reference = li.compute_influence(model, task_class(), data, Subset(data, [0, 1]))
    cases = [
        (model, task_class(), "x", "y"),  # {x, y}: x positional
        (model, task_class(), "x", "label"),
        (_PixelModel(model), task_class(), "pixel_values", "labels"),  # keyword, as Hugging Face models take it
        (model, task_class(input_key="features", label_key="target"), "features", "target"),
    ]
    for net, task, input_key, label_key in cases:
        dicts = _DictData(data, input_key, label_key)
        result = li.compute_influence(net, task, dicts, Subset(dicts, [0, 1]))
        torch.testing.assert_close(result.scores, reference.scores)


def test_dict_batch_without_a_label_key_says_which_keys_it_looked_for():
    data = _DictData(classification_data(n=4), "x", "target")
    with pytest.raises(KeyError, match="labels.*label.*y.*label_key"):
        li.fit_factors(mlp(), li.ClassificationTask(), data)


# -- 6. layers left out must be visible --------------------------------------------------------------

class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_warns_when_the_tracked_layers_hold_under_half_the_parameters():
    with pytest.warns(UserWarning, match=r"tracked layers hold \d+% of the trainable parameters.*lstm \(LSTM"):
        names = [layer.name for layer in li.select_layers(_Recurrent())]
    assert names == ["head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        li.select_layers(mlp())  # everything tracked: silent
        li.select_layers(_Recurrent(), layers=["head"])  # an explicit choice: silent


# -- 7. causal LM batches given as tuples ----------------------------------------------------------

def test_causal_lm_task_accepts_token_tuples_and_explains_other_batches():
    model, task = TinyTransformer().double(), li.CausalLMTask()
    ids = TokenData(n=6, length=5, pad=False).input_ids
    as_dicts = [{"input_ids": row} for row in ids]
    reference = li.compute_influence(model, task, as_dicts, as_dicts[:2])
    for tuples in (TensorDataset(ids), TensorDataset(ids, ids.clone())):
        result = li.compute_influence(model, task, tuples, Subset(tuples, [0, 1]))
        torch.testing.assert_close(result.scores, reference.scores)
    with pytest.raises(TypeError, match="input_ids.*got a tuple of 3"):
        task.batch_size((ids, ids, ids))
    with pytest.raises(TypeError, match="input_ids.*got a dict with keys \\['tokens'\\]"):
        task.forward(model, {"tokens": ids})
