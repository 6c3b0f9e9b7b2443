"""``keep_top_scores``: per query only the most positive / negative scores and a sketch of the rest
instead of dense ``[Q, N]`` scores. On a digits-sized run the analyses equal the dense ones (exactly,
or to a stated tolerance where a histogram stands in for the scores not kept); the pass never holds
``[Q, N]``; the result saves, loads, summarises, compares and reports; the callback produces it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_influence as li
from lightning_influence.analysis import sketch as score_sketch
from lightning_influence.analysis import summarize
from lightning_influence.analysis.compare import compare
from lightning_influence.analysis.monitors import monitor_scalars
from lightning_influence.reporting.publisher import ResultPublisher
from lightning_influence.checkpoint.session import InfluenceSession
from tests.reliability_helpers import fit, make_callback

# Where a histogram bin (a quarter octave) stands in for the scores that were not kept.
HISTOGRAM_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def digits_run():
    """A small MLP trained briefly on scikit-learn's bundled digits (1397 training images) with its
    EK-FAC factors, and 16 validation images as queries: the size of the digits example."""
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).flatten(1) / 16
    labels = torch.tensor(digits.target)
    train, val = TensorDataset(images[400:], labels[400:]), TensorDataset(images[:400], labels[:400])
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    task = li.ClassificationTask()
    factors = li.fit_factors(model, task, train, fisher="empirical")
    return model, task, train, Subset(val, range(16)), factors


def _score(run, keep):
    model, task, train, queries, factors = run
    session = InfluenceSession(task, train, queries, scoring=dict(top_k=5, batch_size=128, keep_top_scores=keep))
    return session.score(model, factors)


@pytest.fixture(scope="module")
def dense_result(digits_run):
    return _score(digits_run, None)


def _fit_fields(fit):
    return None if fit is None else dataclasses.astuple(fit)


def test_kept_scores_give_the_dense_tail_fits_and_layer_distribution(digits_run, dense_result):
    """With every positive score kept (800 of 1397 per query) the tail fits are identical to the
    dense ones, field by field, and so are the layer distribution, the top examples and their token
    scores; concentration and spread agree to float64 rounding."""
    dense, kept = dense_result, _score(digits_run, 800)
    assert kept.scores is None and kept.is_sketch and kept.get("kept_top_scores").shape == (16, 800)
    sketch = score_sketch.ScoreSketch.of(kept)
    assert all(sketch.all_positives_kept(q) for q in range(16)), "the premise: every positive score is kept"
    dense_summary, kept_summary = summarize(dense), summarize(kept)
    assert [_fit_fields(f) for f in kept_summary.tail_fits] == [_fit_fields(f) for f in dense_summary.tail_fits]
    assert sum(f is not None for f in kept_summary.tail_fits) == 16
    assert torch.equal(kept_summary.layer_shares, dense_summary.layer_shares)
    for name in ("top_ids", "bottom_ids", "top_token_scores", "top_layer_scores"):
        assert torch.equal(kept.get(name).nan_to_num(), dense.get(name).nan_to_num()), name
    for key, value in dense_summary.scalars.items():
        if key != "tail_alpha_abs":  # |s| has more non-zero values than were kept: see the next test
            assert kept_summary.scalars[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert kept_summary.scalars["tail_partial_fraction"] == 0.0


def test_with_few_scores_kept_the_sketch_stands_in_for_the_rest(dense_result):
    """100 of 1397 scores kept per query: positive fraction, top-1% share (13 examples), mean |s| and
    standard deviation stay exact; the Gini coefficient and the top-10% share (139 examples) come
    from the histogram within 1e-3; the tail fits are flagged as partial (a fit from the top 100
    finds a steeper, shorter tail than the dense fit, whose tails hold 300-480 scores)."""
    dense = dense_result
    sketch = score_sketch.ScoreSketch(16, 100)
    for start in range(0, dense.num_train, 128):  # as the pass fills it, batch by batch
        sketch.update(dense.scores[:, start:start + 128], dense.train_ids[start:start + 128])
    exact = li.analysis.concentration(dense.scores)
    approximate = score_sketch.concentration(sketch)
    assert approximate["positive_fraction"] == pytest.approx(exact["positive_fraction"], rel=1e-12)
    assert approximate["top1pct_share"] == pytest.approx(exact["top1pct_share"], rel=1e-9)
    for key in ("gini", "top10pct_share"):
        assert abs(approximate[key] - exact[key]) < HISTOGRAM_TOLERANCE, key
    finite = dense.scores.double()
    spread = score_sketch.score_spread(sketch)
    assert spread["score_abs_mean"] == pytest.approx(float(finite.abs().mean()), rel=1e-9)
    assert spread["score_std"] == pytest.approx(float(finite.std()), rel=1e-6)
    assert all(score_sketch.tail_partial(sketch))
    assert torch.equal(sketch.top_values, dense.scores.topk(100).values)


def test_a_large_pool_is_scored_without_a_dense_score_matrix(monkeypatch):
    """2048 examples x 32 queries with 8 kept: every batch the sketch holds at most [Q, 8] scores,
    the pass never builds [Q, N], and the kept ones are the dense top / bottom 8 with their ids."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    pool = TensorDataset(torch.randn(2048, 4), torch.randn(2048, 2))
    queries = TensorDataset(torch.randn(32, 4), torch.randn(32, 2))
    task = li.RegressionTask()
    factors = li.fit_factors(model, task, pool, fisher="empirical", batch_size=512)
    shapes = []
    update = score_sketch.ScoreSketch.update

    def recording_update(self, scores, ids):
        update(self, scores, ids)
        shapes.append((tuple(scores.shape), tuple(self.top_values.shape), tuple(self.bottom_ids.shape)))

    monkeypatch.setattr(score_sketch.ScoreSketch, "update", recording_update)
    kept = li.compute_influence(model, task, pool, queries, factors, keep_top=8, batch_size=256,
                                train_ids=torch.arange(2048) + 10_000)
    assert len(shapes) == 8 and all(batch == (32, 256) and top == (32, 8) and bottom == (32, 8)
                                     for batch, top, bottom in shapes)
    assert kept.scores is None and kept.num_train == 2048 and kept.get("score_moments").shape == (32, 6)
    monkeypatch.undo()
    dense = li.compute_influence(model, task, pool, queries, factors, batch_size=256)
    for largest, side in ((True, "top"), (False, "bottom")):
        found = dense.scores.topk(8, largest=largest)
        assert torch.allclose(kept.get(f"kept_{side}_scores"), found.values, rtol=1e-5)
        assert torch.equal(kept.get(f"kept_{side}_ids"), found.indices + 10_000)
    assert kept.get("score_moments")[:, 0].eq(2048).all()


def test_a_kept_result_saves_loads_compares_and_reports(digits_run, tmp_path):
    """Saved and loaded as it was; compared with another kept result on its top lists (no rank
    correlation, said by NaN), monitored, and reported with its tail figures; aggregation, which
    needs every score, is refused naming the setting."""
    kept = _score(digits_run, 200)
    kept.save(tmp_path / "kept")
    loaded = li.InfluenceResult.load(tmp_path / "kept")
    assert loaded.is_sketch and repr(loaded).endswith("path='" + str(tmp_path / "kept") + "')")
    assert torch.equal(loaded.top_k(5).indices, kept.get("top_ids"))
    assert summarize(loaded).scalars == summarize(kept).scalars
    same = compare(loaded, kept)
    assert same.topk_jaccard == {1: 1.0, 5: 1.0, 10: 1.0, 50: 1.0} and torch.isnan(same.spearman).all()
    assert same.concentration[0] == same.concentration[1]
    scalars = monitor_scalars(loaded, kept, k=10)
    assert scalars["drift/topk_churn@10"] == 0.0 and "drift/spearman" not in scalars
    assert 0 < scalars["max_top1_share"] <= 1
    with pytest.raises(ValueError, match="keep_top_scores"):
        li.aggregate([loaded, kept])
    with pytest.raises(ValueError, match="at most that many"):
        loaded.top_k(201)
    broken = {name: loaded.get(name) for name in score_sketch.SKETCH_FIELDS}
    broken["kept_top_ids"] = broken["kept_top_ids"][:, :5]
    with pytest.raises(ValueError, match="the score sketch's shapes do not fit 16 queries and 1397 training"):
        li.InfluenceResult(train_ids=loaded.train_ids, query_ids=loaded.query_ids, **broken)
    ResultPublisher((), top_k=3, max_queries=1).publish(loaded, step=1, history=[loaded])
    written = json.loads((tmp_path / "kept" / "report" / "summary.json").read_text())
    assert written["scalars"]["tail_partial_fraction"] == 1.0 and "tail/q0" in written["figures"]
    assert "score_histograms" not in written["figures"]  # no histogram of every score to draw
    assert written["top_examples"][0]["score"] == pytest.approx(float(kept.get("kept_top_scores")[0, 0]))


def test_the_callback_keeps_top_scores_when_asked(tmp_path):
    """A real Trainer with keep_top_scores: the saved result holds the sketch, no dense scores, and
    its top examples with their token scores."""
    cb = make_callback(tmp_path, scoring=dict(keep_top_scores=12, top_k=3), every_n_epochs=None)
    fit(tmp_path, cb)
    result = cb.results[-1]
    assert result.scores is None and result.get("kept_top_scores").shape == (4, 12)
    assert result.get("top_token_scores").shape[:2] == (4, 3)
    assert result.meta["keep_top_scores"] == 12 and math.isfinite(summarize(result).scalars["gini"])
