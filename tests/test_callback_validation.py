"""Bad input is rejected before the first training step, with a message that says what to change."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import IterableDataset, TensorDataset

import lightning_influence as li
from lightning_influence.callback import InfluenceCallback
from tests.callback_models import make_datamodule_class, make_module_class, planted_data

Classifier = make_module_class(pl)
BlobData = make_datamodule_class(pl)


class CountSteps(pl.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


class MeanLoss(li.ClassificationTask):
    def loss_from_outputs(self, outputs, batch):
        return super().loss_from_outputs(outputs, batch).mean()


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


CASES = {
    "empty query set": (dict(query_data=TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))), {},
                        "query set is empty"),
    "mismatched query set": (dict(query_data=TensorDataset(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))), {},
                             "cannot evaluate the model on a query batch"),
    "unknown module name": (dict(layers=["net.7"]), {}, "no module named or matching 'net.7'.*did you mean"),
    "nothing trackable": (dict(exclude=["net.*"]), {}, "no trackable layer"),
    "loss not per example": (dict(task=MeanLoss()), {}, "loss must be per example"),
    "every_n_epochs never fires": (dict(every_n_epochs=5), dict(max_epochs=2), "every_n_epochs=5 never fires"),
    "every_n_train_steps never fires": (dict(every_n_train_steps=50, every_n_epochs=None), dict(max_steps=20),
                                        "every_n_train_steps=50 never fires"),
    "max_train_examples over pool": (dict(max_train_examples=500), {}, "max_train_examples=500 is larger"),
    "train_data without __len__": (dict(train_data=Stream()), {}, "has no __len__"),
    "windows without statistics": (dict(collect_every_n_steps=16), {}, "collect_every_n_steps=16 is more than"),
    "no validation data for 'val'": (dict(), dict(no_val=True), "no val DataLoader"),
    "fisher='true' with a task that cannot sample": (dict(fisher="true", task=type("T", (MeanLoss,), {
        "loss_from_outputs": li.ClassificationTask.loss_from_outputs,
        "sample_loss_from_outputs": li.Task.sample_loss_from_outputs})()), {}, "fisher='true' needs a task"),
    "manual optimization": (dict(), dict(model=Manual), "automatic optimization"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rejected_before_training(tmp_path, name):
    kwargs, trainer_kwargs, match = CASES[name]
    trainer_kwargs = dict(trainer_kwargs)
    model = trainer_kwargs.pop("model", Classifier)()
    train, val, _ = planted_data()
    data = BlobData(train, val)
    if trainer_kwargs.pop("no_val", False):
        data.val_dataloader = None
        data = None
    settings = dict(task=li.ClassificationTask(), output_dir=str(tmp_path), report=False, show_progress=False)
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


def test_compiled_model_is_refused(tmp_path):
    model = Classifier()
    model.net = torch.compile(model.net)
    train, val, _ = planted_data()
    trainer = pl.Trainer(callbacks=[InfluenceCallback("classification", output_dir=str(tmp_path), report=False)],
                         logger=False, enable_progress_bar=False, max_epochs=1, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="torch.compile"):
        trainer.fit(model, BlobData(train, val))
