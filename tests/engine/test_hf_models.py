"""Hugging Face models under the callback: tiny GPT-2, Llama and BERT built from configs, trained a
few steps on generated token data. Planted duplicates rank first, dict and ``BatchEncoding``
batches work, padding changes nothing, the tied unembedding is left out, activation checkpointing
collects the same statistics, and LoRA adapters are tracked with finite scores from initialisation."""

from __future__ import annotations

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch

import lightning_influence as li
from tests.callback_models import merged_settings
from tests.hf_models import (HFModule, batch_encoding_collate, enable_activation_checkpointing, loader, repadded,
                             tiny_bert, tiny_gpt2, tiny_llama, token_examples)
from tests.reliability_helpers import assert_statistics_close, make_callback, make_trainer

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
AT_END = dict(every_n_epochs=None, on_checkpoint=False, on_train_end=True)


def train(tmp_path, model, examples, queries, task, *, epochs: int = 1, max_steps: int = -1, collate=None,
          lr: float = 1e-2, optimizer: type = torch.optim.Adam, **settings):
    """Fit ``HFModule(model)`` on ``examples`` (unshuffled, batches of 8) with the callback; returns
    it, with ``statistics_at_end``: its statistics when training ended (before computing influence
    resets them)."""
    settings = merged_settings({"num_queries": len(queries), "scoring": {"top_k": 3}}, settings)
    cb = make_callback(tmp_path, task=task, query_data=loader(queries, collate=collate), **settings)
    snapshot = StatisticsAtTrainEnd(cb)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [snapshot, cb], max_epochs=epochs, max_steps=max_steps, limit_val_batches=0)
    trainer.fit(HFModule(model, lr=lr, optimizer=optimizer), loader(examples, collate=collate))
    cb.statistics_at_end = snapshot.statistics
    return cb


class StatisticsAtTrainEnd(pl.Callback):
    """Copies the influence callback's statistics when training ends, before it computes (and
    resets them): placed before it in the trainer's callbacks."""

    def __init__(self, source) -> None:
        self.source = source
        self.statistics = None

    def on_train_end(self, trainer, pl_module):
        self.statistics = copy.deepcopy(self.source.statistics)


def copies(examples, ids):
    """Exact copies of some training examples, used as queries: each should find its original first."""
    return [{key: value.clone() for key, value in examples[i].items()} for i in ids]


def loss_reduction_warnings(caught) -> list:
    return [str(w.message) for w in caught if "loss_reduction" in str(w.message)]


def test_gpt2_duplicates_rank_first_with_token_scores_and_the_tied_unembedding_left_out(tmp_path):
    """GPT-2 (``Conv1D`` attention) on dict batches of variable length: each query's copy in the
    pool is its top example; the token-mean loss HF returns raises no loss-reduction warning; the
    top examples' token scores follow their attention masks; ``lm_head`` (tied to ``wte``) is not tracked."""
    pool = token_examples(24, seed=1, min_len=8)
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = train(tmp_path, model, pool, copies(pool, range(4)), li.CausalLMTask(), epochs=4,
                   curvature={"loss_reduction": "token_mean"}, **AT_END)
    assert loss_reduction_warnings(caught) == []
    result = cb.results[-1]
    assert "model.lm_head" not in result.layer_names
    assert "model.transformer.h.0.attn.c_attn" in result.layer_names  # Conv1D, tracked natively
    assert not any("wte" in name or "wpe" in name for name in result.layer_names)
    assert result.top_k(1).indices[:, 0].tolist() == [0, 1, 2, 3]

    top_ids, token_scores, token_mask = (result.get(k) for k in ("top_ids", "top_token_scores", "top_token_mask"))
    assert token_scores.shape == token_mask.shape == (4, 3, 12)
    expected_mask = torch.stack([torch.stack([pool[int(i)]["attention_mask"].bool() for i in row]) for row in top_ids])
    assert torch.equal(token_mask, expected_mask) and not expected_mask.all()  # some padding among the top examples
    assert torch.all(token_scores[~token_mask] == 0)
    torch.testing.assert_close(token_scores.sum(-1), result.scores.gather(1, top_ids), rtol=1e-4, atol=1e-6)


def test_llama_duplicates_rank_first_with_batch_encoding_batches(tmp_path):
    """A Llama (``nn.Linear`` projections, untied ``lm_head``) whose collate function returns a
    ``transformers.BatchEncoding``, as tokenizers' padding collators do."""
    pool = token_examples(24, seed=2, min_len=8)
    cb = train(tmp_path, tiny_llama(), pool, copies(pool, range(4)), li.CausalLMTask(), epochs=4,
               collate=batch_encoding_collate, curvature={"loss_reduction": "token_mean"}, **AT_END)
    result = cb.results[-1]
    assert "model.lm_head" in result.layer_names and "model.model.layers.1.self_attn.q_proj" in result.layer_names
    assert result.top_k(1).indices[:, 0].tolist() == [0, 1, 2, 3]


def test_bert_classifier_duplicates_rank_first_on_dict_batches(tmp_path):
    """BERT for sequence classification with ``{input_ids, attention_mask, labels}`` batches
    (ClassificationTask passes every key but the labels to the model)."""
    labels = torch.Generator().manual_seed(3)
    classes = torch.randint(0, 2, (24,), generator=labels).tolist()
    pool = token_examples(24, seed=3, min_len=8, labels=classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = train(tmp_path, tiny_bert(), pool, copies(pool, range(4)), li.ClassificationTask(), epochs=4, lr=3e-3,
                   **AT_END)
    assert loss_reduction_warnings(caught) == []  # HF's classification loss is the example mean
    result = cb.results[-1]
    assert result.top_k(1).indices[:, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_extra_padding_changes_neither_statistics_nor_scores(tmp_path, name):
    """The same sequences padded to 12 and to 16 positions: padded positions count in no statistic
    and carry no score, so both runs agree."""
    if name == "bert":
        # K-FAC with a fixed damping: in BERT's last block only the [CLS] position has a gradient, so S
        # is rank-deficient (16 examples) and EK-FAC's corrected eigenvalues depend on the arbitrary
        # basis of its null space; and the heuristic damping is ~1e-8 on the lower layers. Both amplify
        # rounding differences into score differences of several percent.
        build, task, settings = tiny_bert, li.ClassificationTask(), {"curvature": {"strategy": "kfac", "damping": 1e-4}}
        labels = [i % 2 for i in range(16)]
    else:
        build, task, settings = tiny_gpt2, li.CausalLMTask(), {"curvature": {"loss_reduction": "token_mean"}}
        labels = None
    pool = token_examples(16, seed=4, min_len=6, labels=labels)
    # SGD: Adam's normalised steps would blow up float rounding differences in near-zero gradients
    runs = [train(tmp_path / str(pad_to), build(), repadded(pool, pad_to), repadded(pool[:3], pad_to), task,
                  lr=0.1, optimizer=torch.optim.SGD, **AT_END, **settings) for pad_to in (12, 16)]
    snapshots = [cb.statistics_at_end for cb in runs]
    results = [cb.results[-1] for cb in runs]
    assert_statistics_close(snapshots[1], snapshots[0], rtol=1e-4)
    torch.testing.assert_close(results[1].scores, results[0].scores, rtol=1e-3, atol=1e-3 * float(
        results[0].scores.abs().max()))


def test_a_loss_reduction_that_does_not_match_hf_loss_is_warned(tmp_path):
    """HF's causal-LM loss is a token mean: declaring ``"mean"`` (per example) is caught on the
    first collected step, with the right setting named."""
    pool = token_examples(8, seed=5)
    with pytest.warns(RuntimeWarning, match="set loss_reduction='token_mean'"):
        train(tmp_path, tiny_gpt2(), pool, pool[:2], li.CausalLMTask(), curvature={"loss_reduction": "mean"}, **AT_END)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_activation_checkpointing_collects_the_same_statistics(tmp_path, name, use_reentrant):
    """``activation_checkpointing_enable`` (HF's ``gradient_checkpointing_enable``) recomputes each
    block's forward in the backward pass: the statistics and the scores at the end equal those of
    the same run without checkpointing, and the callback's own passes (eval mode) work."""
    pool = token_examples(16, seed=6, min_len=8)
    runs, block_calls = [], []
    for checkpointed in (False, True):
        model = MODELS[name]()
        if checkpointed:
            enable_activation_checkpointing(model, use_reentrant)
        calls = []
        # a tracked layer early in a block (torch stops recomputing once the saved tensors are back)
        layer = model.transformer.h[0].attn.c_attn if name == "gpt2" else model.model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda module, *_: calls.append(module.training))
        runs.append(train(tmp_path / str(checkpointed), model, pool, pool[:3], li.CausalLMTask(),
                          curvature={"loss_reduction": "token_mean"}, **AT_END))
        block_calls.append(sum(calls))  # forwards in training mode
    plain, checkpointed = runs
    assert block_calls[1] > block_calls[0]  # the blocks were recomputed in the backward passes
    assert float(next(iter(plain.statistics_at_end.state.values()))["s_count"]) > 0
    assert_statistics_close(checkpointed.statistics_at_end, plain.statistics_at_end, rtol=1e-4)
    scores = plain.results[-1].scores
    torch.testing.assert_close(checkpointed.results[-1].scores, scores, rtol=1e-3,
                               atol=1e-4 * float(scores.abs().max()))


def test_lora_adapters_are_tracked_and_score_finitely_from_initialisation(tmp_path):
    """PEFT LoRA on the Llama's q_proj / v_proj: only the adapters are tracked (the frozen base
    weights are not), and influence after the first step, whose statistics saw ``lora_B = 0`` (no
    curvature for ``lora_A``: K-FAC's S eigenvalues are all 0, used as collected with
    ``curvature.refresh="never"``), is finite under EK-FAC and K-FAC."""
    peft = pytest.importorskip("peft")
    pool = token_examples(16, seed=7, min_len=8)
    for strategy in ("ekfac", "kfac"):
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["q_proj", "v_proj"]))
        cb = train(tmp_path / strategy, model, pool, pool[:3], li.CausalLMTask(),
                   curvature={"loss_reduction": "token_mean", "strategy": strategy, "refresh": "never"},
                   every_n_epochs=None, every_n_train_steps=1, on_checkpoint=False, on_train_end=False, max_steps=2)
        results = cb.results
        assert [r.step for r in results] == [1, 2]
        names = results[0].layer_names
        assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert {n.split(".self_attn.")[1].split(".")[0] for n in names} == {"q_proj", "v_proj"}
        for result in results:
            assert torch.isfinite(result.scores).all() and result.scores.abs().max() > 0
        if strategy == "kfac":
            first = li.load_factors(li.results.factors_path(results[0]))
            assert all(float(first.layers[n]["eig_s"].abs().max()) == 0 for n in names if ".lora_A." in n)
