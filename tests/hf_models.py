"""Tiny Hugging Face models (built from configs: nothing is downloaded), a LightningModule around
them, and generated token data for ``tests/engine/test_hf_models.py``.

Dropout is 0 everywhere so that two runs from the same seed are identical (what the activation
checkpointing comparison needs)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

transformers = pytest.importorskip("transformers")

VOCAB = 64
SEQ_LEN = 12
PAD_ID = 0


def tiny_gpt2(seed: int = 0):
    """GPT-2 (``Conv1D`` projections, ``lm_head`` tied to ``wte``), 2 blocks of width 32."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD_ID)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0):
    """A Llama (``nn.Linear`` projections, grouped-query attention, untied ``lm_head``)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=PAD_ID)
    return transformers.LlamaForCausalLM(config)


def tiny_bert(seed: int = 0):
    """BERT for two-class sequence classification."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID)
    return transformers.BertForSequenceClassification(config)


def enable_activation_checkpointing(model, use_reentrant: bool) -> None:
    """Hugging Face's activation checkpointing (``activation_checkpointing_enable`` in transformers
    5, ``gradient_checkpointing_enable`` before), as a user turns it on."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


class HFModule(pl.LightningModule):
    """Trains a Hugging Face model on dict batches with the loss the model computes itself
    (``outputs.loss``: the token mean for causal LMs, the example mean for classifiers)."""

    def __init__(self, model, lr: float = 1e-2, optimizer: type = torch.optim.Adam) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return self.optimizer([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def token_examples(count: int, seed: int, min_len: int = SEQ_LEN, pad_to: int = SEQ_LEN,
                   labels: Optional[Sequence[int]] = None) -> List[Dict[str, torch.Tensor]]:
    """``count`` random token sequences of lengths in ``[min_len, SEQ_LEN]``, right-padded with
    ``PAD_ID`` to ``pad_to``: ``{input_ids, attention_mask, labels}``. Causal-LM labels are the
    inputs with padding set to -100 (Hugging Face's ignore index); class ``labels`` replace them."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = int(torch.randint(min_len, SEQ_LEN + 1, (), generator=generator))
        ids = torch.full((pad_to,), PAD_ID)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask = (torch.arange(pad_to) < length).long()
        target = torch.tensor(labels[index]) if labels is not None else ids.masked_fill(mask == 0, -100)
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": target})
    return examples


def repadded(examples: Sequence[Dict[str, torch.Tensor]], pad_to: int) -> List[Dict[str, torch.Tensor]]:
    """The same examples with extra right padding up to ``pad_to`` positions."""
    fill = {"input_ids": PAD_ID, "attention_mask": 0, "labels": -100}
    out = []
    for example in examples:
        extra = pad_to - example["input_ids"].shape[0]
        out.append({key: torch.cat([value, value.new_full((extra,), fill[key])]) if value.dim() else value
                    for key, value in example.items()})
    return out


def batch_encoding_collate(items):
    """Collate into a ``transformers.BatchEncoding``, as a tokenizer's padding collator returns."""
    return transformers.BatchEncoding(default_collate(items))


def loader(examples, batch_size: int = 8, collate: Optional[Callable] = None) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate)
