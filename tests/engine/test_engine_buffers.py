"""The engine's extra passes during a training step (the loss-reduction check runs one before the
user's backward) must leave the step's graph usable: buffers it saved for the backward (batch
norm's running statistics, BERT's ``token_type_ids``) must not be written in place, while any
change the extra pass makes to them is still undone."""

from __future__ import annotations

import torch
from torch import nn

from lightning_influence.engine import passes
from tests.reliability_helpers import Classifier, fit, make_callback, seeded


class BufferedEmbedding(nn.Module):
    """Embeds a constant index buffer (as BERT embeds its default ``token_type_ids``), with batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("type_ids", torch.zeros(1, 5, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.embedding(self.type_ids[:, : x.shape[0]]).squeeze(0))


def test_restored_buffers_keep_the_training_graph_usable_and_undo_changes():
    model = BufferedEmbedding().train()
    x = torch.randn(5, 3)
    loss = model(x).square().sum()  # saves type_ids (a view) and the running statistics for the backward
    running_mean = model.norm.running_mean.clone()
    with passes.buffers_restored(model), torch.no_grad():
        model(x + 1.0)  # moves the batch-norm running statistics
    torch.testing.assert_close(model.norm.running_mean, running_mean)
    loss.backward()  # refused when a saved buffer was written ("modified by an inplace operation")
    assert model.embedding.weight.grad is not None


class NormedClassifier(Classifier):
    """The blob classifier with batch norm after its hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net.insert(1, nn.BatchNorm1d(16))


def test_the_callback_trains_a_batch_norm_model(tmp_path):
    """The callback's loss-reduction check on the first collected step runs the model in training
    mode before the step's backward; training continues and the running statistics are the model's own."""
    cb = make_callback(tmp_path, every_n_epochs=1, on_checkpoint=False, on_train_end=False)
    trainer, model = fit(tmp_path, cb, seeded(NormedClassifier))
    assert [r.step for r in cb.results] == [trainer.global_step]
    assert int(model.net[1].num_batches_tracked) == trainer.global_step  # the check's forward left no trace
