"""Accuracy of the callback's curvature (collected while training) against the dense damped
Gauss-Newton oracle at the final weights, for the empirical and the true Fisher.

Measured over 5 seeds (see the issue-3 note): Pearson correlation of the callback's final scores
with the oracle using its own heuristic damping: empirical 0.825, true 0.813; with the damping the
callback chose: empirical 0.61, true 0.74. Offline EK-FAC with the exact Gauss-Newton at the final
weights reaches 0.79 - 0.82 against the same oracle. The empirical Fisher is the default: no worse
against the oracle and free (no extra backward). This test keeps one seed with margins.
"""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

import lightning_influence as li
from lightning_influence.loops.callback import InfluenceCallback
from lightning_influence.engine.oracle import dense_influence
from tests.callback_models import blobs, make_datamodule_class, make_module_class


def _pearson(a, b):
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_scores_correlate_with_dense_gauss_newton_oracle(tmp_path, fisher):
    pl.seed_everything(0, verbose=False)
    x, y = blobs(128, 0)
    xv, yv = blobs(16, 100)
    cb = InfluenceCallback("classification", num_queries=16, every_n_epochs=1, on_checkpoint=False, on_error="raise",
                           output_dir=str(tmp_path), report=dict(mode="off", show_progress=False),
                           curvature=dict(fisher=fisher, correction_batches=None, collect_every_n_steps=1))
    trainer = pl.Trainer(max_epochs=5, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    model = make_module_class(pl)(hidden=16, lr=0.1)
    trainer.fit(model, make_datamodule_class(pl)(TensorDataset(x, y), TensorDataset(xv, yv)))
    result = cb.results[-1]
    model = model.double()
    train64, queries64 = TensorDataset(x.double(), y), TensorDataset(xv.double(), yv)
    same = dense_influence(model, li.ClassificationTask(), train64, queries64, result.layer_names, result.meta["damping"])
    own = {name: 0.1 * float(torch.linalg.eigvalsh(block).mean()) for name, block in same.blocks.items()}
    oracle = dense_influence(model, li.ClassificationTask(), train64, queries64, result.layer_names, own)
    scores = result.scores.double()
    corr_own, corr_same = _pearson(scores, oracle.scores), _pearson(scores, same.scores)
    print(f"fisher={fisher}: pearson with oracle (own damping) {corr_own:.3f}, (callback's damping) {corr_same:.3f}")
    assert corr_own > 0.6 and corr_same > 0.45
