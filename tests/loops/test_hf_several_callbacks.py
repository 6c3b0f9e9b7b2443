"""Several ``InfluenceTrainerCallback`` in one Hugging Face Trainer (as the distributed matrix runs
them, one per option): each one's statistics equal an offline pass. The first batch's loss check
runs a forward of the model (without gradients) while the other callbacks are recording their
batch: they must not take it for the training forward (they refused it: "needs the model to compute
its loss")."""

import pytest

import lightning_influence as li
from lightning_influence.engine.curvature_passes import accumulate_covariances

transformers = pytest.importorskip("transformers")

from tests.loops.test_integrations import TEST_SETTINGS, TokenData, assert_statistics_equal, hf_trainer, tiny_gpt2  # noqa: E402


def test_several_hf_callbacks_each_collect_the_offline_statistics(tmp_path):
    from lightning_influence.loops.hf import InfluenceTrainerCallback

    callbacks = [InfluenceTrainerCallback(li.CausalLMTask(), TokenData(4, seed=1), on_train_end=False,
                                          every_n_train_steps=1000, output_dir=str(tmp_path / f"influence{index}"),
                                          **TEST_SETTINGS, **settings)
                 for index, settings in enumerate([{}, {"scoring": {"query_rank": 2}}])]
    model = tiny_gpt2()
    trainer = hf_trainer(tmp_path, model, callbacks[0], accumulation=2)
    trainer.add_callback(callbacks[1])
    trainer.train()
    offline = accumulate_covariances(model, li.CausalLMTask(), TokenData(24, seed=0), li.select_layers(model),
                                     fisher="empirical", batch_size=4)
    for callback in callbacks:
        assert_statistics_equal(callback.statistics, offline)
