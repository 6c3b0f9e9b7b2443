"""A streaming pool (``IterableDataset`` with a stable integer id per item) through
``InfluenceSession``: the scores and ids of the equivalent map-style pool, the correction pass on the
stream's first batches, ``max_train_examples`` reading only the first items, each example scored
once across 2 gloo processes, and clear refusals of items without a usable id."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import lightning_influence as li
from lightning_influence.checkpoint.session import InfluenceSession
from tests.callback_models import merged_settings, planted_data
from tests.reliability_helpers import fit, make_callback
from tests.stream_ddp_script import main as stream_ddp_main
from tests.stream_helpers import ID_OFFSET, BlobStream, DictExamples, blob_statistics, trained_blob_model

SCRIPT = Path(__file__).resolve().parents[1] / "stream_ddp_script.py"
QUERIES = Subset(planted_data()[1], range(4))


def _session(pool, **settings):
    defaults = dict(scoring=dict(top_k=3, batch_size=16))
    return InfluenceSession(li.ClassificationTask(), pool, QUERIES, **merged_settings(defaults, settings))


@pytest.mark.parametrize("keep_top_scores", [None, 20])
def test_a_stream_gives_the_map_style_scores_under_its_ids(keep_top_scores):
    """Streamed in reverse with ids 1000 + index: the same scores, top examples and token scores as
    the map-style pool, keyed by the stream's ids (sorted), dense or with keep_top_scores."""
    model = trained_blob_model()
    factors = li.fit_factors(model, li.ClassificationTask(), DictExamples(), fisher="empirical")
    mapped = _session(DictExamples(), scoring=dict(keep_top_scores=keep_top_scores)).score(model, factors)
    streamed = _session(BlobStream(), scoring=dict(keep_top_scores=keep_top_scores)).score(model, factors)
    assert torch.equal(streamed.train_ids, mapped.train_ids + ID_OFFSET)
    assert streamed.meta["streaming_pool"] and streamed.meta["run"]["pool_size"] == 96
    for name in ("top_ids", "bottom_ids", "kept_top_ids", "kept_bottom_ids"):
        if mapped.get(name) is not None:
            assert torch.equal(streamed.get(name), mapped.get(name) + ID_OFFSET), name
    for name in ("scores", "top_token_scores", "layer_abs_sums", "kept_top_scores", "score_moments"):
        if mapped.get(name) is not None:
            torch.testing.assert_close(streamed.get(name), mapped.get(name), rtol=1e-5, atol=1e-6, msg=name)
    assert (streamed.scores is None) == (keep_top_scores is not None)


def test_the_correction_pass_reads_the_streams_first_batches():
    """correction_batches=2 of 16: the eigenvalue correction (and the covariance refresh) from the
    stream's first 32 items, as fit_factors gives on exactly those examples."""
    model = trained_blob_model()
    statistics = blob_statistics(model)
    session = _session(BlobStream(), curvature=dict(correction_batches=2))
    fitted = session.fit_factors(model, statistics)
    first_items = Subset(DictExamples(), list(reversed(range(96)))[:32])
    expected = li.fit_factors(model, li.ClassificationTask(), first_items, "ekfac", "empirical",
                              covariances=blob_statistics(model), batch_size=16, refresh="auto")
    assert fitted.meta["curvature"] == expected.meta["curvature"]
    for name in fitted.layer_names:
        torch.testing.assert_close(fitted.eigenvalues(name), expected.eigenvalues(name))


def test_max_train_examples_reads_only_the_first_items():
    model = trained_blob_model()
    factors = li.fit_factors(model, li.ClassificationTask(), DictExamples(), fisher="empirical")
    stream = BlobStream()
    result = _session(stream, scoring=dict(max_train_examples=40, top_k=0)).score(model, factors)
    assert result.train_ids.tolist() == [ID_OFFSET + index for index in range(56, 96)]
    assert stream.yielded == 40  # nothing past the limit is read


@pytest.mark.parametrize("stream,message", [
    (BlobStream(id_key=None), "item 0 of the streaming pool has no 'id' key (it has ['x', 'y'])"),
    (BlobStream(id_of=lambda index: f"row-{index}"), "has 'id' = 'row-95'; ids must be integers"),
    (BlobStream(id_of=lambda index: index % 50), "yielded the ids [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] more than once"),
], ids=["no-id", "string-id", "repeated-ids"])
def test_items_without_a_usable_id_are_refused(stream, message):
    model = trained_blob_model()
    factors = li.fit_factors(model, li.ClassificationTask(), DictExamples(), fisher="empirical")
    with pytest.raises(ValueError, match=re.escape(message)):
        session = _session(stream)
        session.check(model, li.select_layers(model))
        session.score(model, factors)


def test_another_id_key_is_read_and_the_memory_estimate_says_what_grows():
    model = trained_blob_model()
    layers = li.select_layers(model)
    session = _session(BlobStream(id_key="row"), scoring=dict(pool_id_key="row"))
    session.check(model, layers)  # the check's batch is read without its id too
    assert "scores 4 bytes x 4 queries per streamed training example (set keep_top_scores" in \
        session.memory_estimate(layers)
    assert "scores 0.0637 MiB (top/bottom 10 per query and a sketch of the rest, 4 queries" in \
        _session(BlobStream(), scoring=dict(keep_top_scores=10)).memory_estimate(layers)
    assert "(4 queries x 40 training examples" in \
        _session(BlobStream(), scoring=dict(max_train_examples=40)).memory_estimate(layers)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_score_each_streamed_example_once(tmp_path):
    """2 gloo processes: each scores every other item of the stream's first 91, none twice, and
    the gathered result equals the single-process one (scores, ids, top examples), dense or with
    keep_top_scores (the processes' sketches merged)."""
    port, env = _free_port(), dict(os.environ, PYTHONWARNINGS="ignore")
    ranks = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "ddp"), str(rank), "2", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    stream_ddp_main(tmp_path / "single", 0, 1, 0)  # the reference, in this process meanwhile
    for process in ranks:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"a DDP rank failed:\n{output[-4000:]}"
    shares = [set(torch.load(tmp_path / "ddp" / f"rank{rank}.pt").tolist()) for rank in range(2)]
    assert not shares[0] & shares[1] and len(shares[0]) == 46 and len(shares[1]) == 45
    single, ddp = (li.InfluenceResult.load(tmp_path / mode / "result") for mode in ("single", "ddp"))
    assert shares[0] | shares[1] == set(single.train_ids.tolist()) == set(range(ID_OFFSET + 5, ID_OFFSET + 96))
    assert torch.equal(ddp.train_ids, single.train_ids) and ddp.meta["world_size"] == 2
    torch.testing.assert_close(ddp.scores, single.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(ddp.get("top_ids"), single.get("top_ids"))
    single_kept, ddp_kept = (li.InfluenceResult.load(tmp_path / mode / "kept") for mode in ("single", "ddp"))
    for name in ("kept_top_ids", "kept_bottom_ids", "top_ids"):  # the two sketches merged as one
        assert torch.equal(ddp_kept.get(name), single_kept.get(name)), name
    for name in ("kept_top_scores", "score_moments"):
        torch.testing.assert_close(ddp_kept.get(name), single_kept.get(name), rtol=1e-4, atol=1e-4, msg=name)


def test_the_callback_scores_a_streaming_pool_with_kept_top_scores(tmp_path):
    """A real Trainer with a streaming train_data and keep_top_scores: the saved result is keyed by
    the stream's ids and reported (its tables show ids: a stream cannot be indexed)."""
    cb = make_callback(tmp_path, train_data=BlobStream(), scoring=dict(keep_top_scores=10, top_k=3),
                       every_n_epochs=None, report=dict(mode="background"))
    fit(tmp_path, cb)
    (result,) = cb.results
    assert torch.equal(result.train_ids, torch.arange(96) + ID_OFFSET) and result.meta["n_pool"] == 96
    assert result.scores is None and set(result.get("top_ids").flatten().tolist()) <= set(range(1000, 1096))
    assert (Path(result.path) / "report" / "summary.json").is_file()
