import math

import pytest
import torch

from lightning_influence.analysis import concentration, layer_shares
from lightning_influence.analysis.metrics import InfluenceConcentration, LayerShare


def chunks(tensor, size, dim):
    return list(tensor.split(size, dim=dim))


@pytest.mark.parametrize("groups", [None, 2, [[0, 3], [1]]])
def test_layer_share_streaming_equals_functional(groups):
    layer_scores = torch.randn(4, 3, 250, generator=torch.Generator().manual_seed(0))
    metric = LayerShare(groups=groups)
    for chunk in chunks(layer_scores, 64, dim=2):
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), layer_shares(layer_scores, groups=groups))


def test_layer_share_reduces_across_processes_by_summing():
    layer_scores = torch.randn(3, 2, 100, generator=torch.Generator().manual_seed(1))
    ranks = [LayerShare(num_queries=2, num_layers=3) for _ in range(2)]
    ranks[0].update(layer_scores[:, :, :30])
    ranks[1].update(layer_scores[:, :, 30:])
    ranks[0].merge_state(ranks[1])  # what the "sum" reduction does across ranks
    torch.testing.assert_close(ranks[0].compute(), layer_shares(layer_scores))
    idle = LayerShare(num_queries=2, num_layers=3)  # a rank without examples still has the shape
    assert idle.abs_sums.shape == (2, 3)


def test_layer_share_rejects_bad_input_and_early_compute():
    metric = LayerShare()
    with pytest.raises(ValueError, match=r"\[L, Q, n\]"):
        metric.update(torch.randn(3, 10))
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


def test_concentration_streaming_equals_functional():
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(2)) ** 3
    metric = InfluenceConcentration()
    for chunk in chunks(scores, 128, dim=1):
        metric.update(chunk)
    found = metric.compute()
    expected = concentration(scores)
    assert found.keys() == expected.keys()
    for key in expected:
        assert found[key] == pytest.approx(expected[key])
    metric.reset()
    for chunk in chunks(scores[0], 100, dim=0):
        metric.update(chunk)
    assert metric.compute()["gini"] == pytest.approx(concentration(scores[0])["gini"])


def test_concentration_reduces_across_processes_by_concatenating_examples():
    scores = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    ranks = [InfluenceConcentration() for _ in range(2)]
    ranks[0].update(scores[:, :100])
    ranks[1].update(scores[:, 100:])
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute()["top10pct_share"] == pytest.approx(concentration(scores)["top10pct_share"])
    assert not math.isnan(ranks[0].compute()["gini"])
