"""Bad input is rejected before the first training step, with a message that says what to change."""

import pytest
import pytorch_lightning as pl
import torch

import lightning_influence as li
from lightning_influence.loops.callback import InfluenceCallback
from tests.callback_models import make_datamodule_class, make_module_class, planted_data

Classifier = make_module_class(pl)
BlobData = make_datamodule_class(pl)


class CountSteps(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


# The cases issue 8 lists (empty or mismatched queries, unknown names, nothing trackable, a loss that is
# not per example, triggers that never fire, the pool size, manual optimisation, ...) are in
# tests/loops/test_reliability_input.py; these are the callback's further setup checks.
CASES = {
    "windows without statistics": (dict(curvature=dict(collect_every_n_steps=16)), {},
                                   "collect_every_n_steps=16 is more than"),
    "no validation data for 'val'": (dict(), dict(no_val=True), "no val DataLoader"),
    "fisher='true' with a task that cannot sample": (dict(curvature=dict(fisher="true"), task=type("T", (li.ClassificationTask,), {
        "sample_loss_from_outputs": li.Task.sample_loss_from_outputs})()), {}, "fisher='true' needs a task"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rejected_before_training(tmp_path, name):
    kwargs, trainer_kwargs, match = CASES[name]
    trainer_kwargs = dict(trainer_kwargs)
    model = Classifier()
    train, val, _ = planted_data()
    data = BlobData(train, val)
    if trainer_kwargs.pop("no_val", False):
        data.val_dataloader = None
        data = None
    settings = dict(task=li.ClassificationTask(), output_dir=str(tmp_path), report=dict(mode="off", show_progress=False))
    settings.update(kwargs)
    counter = CountSteps()
    trainer = pl.Trainer(callbacks=[InfluenceCallback(**settings), counter], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         **{"max_epochs": 1, **trainer_kwargs})
    with pytest.raises(ValueError, match=match):
        if data is None:
            trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(train, batch_size=16))
        else:
            trainer.fit(model, data)
    assert counter.batches == 0
