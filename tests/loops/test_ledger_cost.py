"""What the per-step ledger costs beside the callback's own work: with ``query_rank`` set it scores
against the queries the session already preconditioned at each computation instead of preparing
its own, with the same scores."""

from __future__ import annotations

import torch

from lightning_influence.loops import ledger
from lightning_influence.checkpoint import session
from lightning_influence.checkpoint.session import InfluenceSession
from tests.reliability_helpers import fit, make_callback

EPOCHS = dict(every_n_epochs=1, on_checkpoint=False, on_train_end=False)


def _ledger_run(tmp_path, monkeypatch):
    """Two epochs computing at each with ``query_rank=1`` (low-rank queries): the results and how
    many query preparations ran."""
    calls = []
    real = session.precondition_queries

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "precondition_queries", counted)
    monkeypatch.setattr(ledger, "precondition_queries", counted)
    cb = make_callback(tmp_path, scoring=dict(ledger=32, query_rank=1), **EPOCHS)
    fit(tmp_path, cb, max_epochs=2)
    return cb.results, len(calls)


def test_ledger_reuses_the_sessions_prepared_queries_when_query_rank_is_set(tmp_path, monkeypatch):
    results, preparations = _ledger_run(tmp_path / "reused", monkeypatch)
    # The ledger's plain queries before training, then one preparation per computation (the session's).
    assert len(results) == 2 and preparations == 1 + 2
    with monkeypatch.context() as patch:
        patch.setattr(InfluenceSession, "take_prepared_queries", lambda self, factors: None)
        own, own_preparations = _ledger_run(tmp_path / "own", patch)
    assert own_preparations == 1 + 2 * 2
    for reused, prepared in zip(results, own):
        assert torch.equal(reused.get("ledger_ids"), prepared.get("ledger_ids"))
        assert torch.equal(reused.get("ledger_scores"), prepared.get("ledger_scores"))
    # The second window scored against queries preconditioned at the first computation: reused ones.
    assert results[1].get("ledger_scores").abs().sum() > 0
