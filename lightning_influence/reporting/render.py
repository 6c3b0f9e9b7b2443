"""Turn a dataset example into something a person can look at: text, highlighted tokens, an image.

Dashboards show the most influential training examples themselves, not just their ids. The
default renderer recognises the common cases (images, token sequences, ``(input, target)``
tuples, Hugging Face style dicts); users with anything else pass their own callable
``render(example, token_scores=None, token_mask=None) -> RenderedExample | str``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch

from lightning_influence._format import format_number

__all__ = ["DefaultRenderer", "ExampleRenderer", "RenderedExample", "highlight_tokens", "render_example"]

_MAX_REPR = 200


@dataclass
class RenderedExample:
    """A viewable form of one example.

    Attributes:
        text: plain-text form, always present (tables, CSV, logs).
        html: tokens highlighted by influence (red helps, blue hurts, opacity by ``|score|``).
        image: ``[H, W]`` or ``[H, W, C]`` uint8 array for image data.
    """

    text: str
    html: Optional[str] = None
    image: Optional[np.ndarray] = None


class ExampleRenderer(Protocol):
    """What ``ResultPublisher(renderer=...)`` accepts."""

    def __call__(
        self, example: Any, token_scores: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None
    ) -> Union[RenderedExample, str]: ...


def _short_repr(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.numel() <= 16 else f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _is_image(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.is_complex():
        return False
    if value.dim() == 3:
        return value.shape[0] in (1, 3) and min(value.shape[1:]) > 1
    return value.dim() == 2 and min(value.shape) > 1 and value.dtype != torch.bool


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point() and not value.is_complex()


def _to_uint8_image(value: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` or ``[H, W]`` tensor to ``[H, W(, 3)]`` uint8, rescaling floats to 0..255."""
    array = value.detach().cpu()
    if array.dim() == 3:
        array = array.permute(1, 2, 0)
        if array.shape[2] == 1:
            array = array[..., 0]
    if array.dtype == torch.uint8:
        return array.numpy().copy()
    array = torch.nan_to_num(array.double())
    low, high = array.min(), array.max()
    if low >= 0 and high <= 1:  # already a [0, 1] image: keep its absolute brightness
        low, high = torch.tensor(0.0), torch.tensor(1.0)
    scale = (high - low).clamp_min(1e-12)
    return ((array - low) / scale * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def highlight_tokens(
    tokens: Sequence[str], scores: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
) -> str:
    """HTML with one ``<span>`` per token, coloured by its influence score.

    Red means the token's influence is positive (it helps the query), blue negative; opacity is
    ``|score| / max |score|`` over the valid tokens. Masked tokens (padding) are greyed out.

    Args:
        tokens: the token strings, rendered as given (escaped).
        scores: ``[T]`` per-token scores aligned with ``tokens`` (extra entries are ignored).
        mask: ``[T]`` bool, ``True`` where the score is real.
    """
    count = len(tokens)
    values = torch.zeros(count, dtype=torch.float64)
    valid = torch.zeros(count, dtype=torch.bool)
    if scores is not None:
        n = min(count, scores.numel())
        values[:n] = torch.nan_to_num(scores.detach().cpu().double().ravel()[:n])
        valid[:n] = True
        if mask is not None:
            valid[:n] &= mask.detach().cpu().bool().ravel()[:n]
    peak = float(values[valid].abs().max()) if valid.any() else 0.0
    spans = []
    for token, value, is_valid in zip(tokens, values.tolist(), valid.tolist()):
        text = html.escape(token)
        if not is_valid:
            style = "color:#999" if scores is not None else ""
        else:
            rgb = "220,40,40" if value > 0 else "40,90,220"
            style = f"background-color:rgba({rgb},{abs(value) / peak if peak > 0 else 0.0:.3f})"
        title = f' title="{format_number(value)}"' if is_valid else ""
        spans.append(f'<span style="{style}"{title}>{text}</span>')
    return '<div style="font-family:monospace;white-space:pre-wrap">' + "".join(spans) + "</div>"


class DefaultRenderer:
    """Renders images, token sequences, ``(input, target)`` pairs and dicts with ``input_ids``.

    Args:
        decode: ``decode(ids) -> list[str]``, one string per token, joined without separator
            (e.g. ``lambda ids: [tokenizer.decode([i]) for i in ids]``). Without it tokens are
            shown as their ids separated by spaces.
        max_tokens: longest sequence shown; longer ones are cut (scores stay aligned).
    """

    def __init__(self, decode: Optional[Callable[[List[int]], Sequence[str]]] = None, max_tokens: int = 512) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.decode = decode
        self.max_tokens = max_tokens

    def __call__(
        self, example: Any, token_scores: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None
    ) -> RenderedExample:
        if isinstance(example, Mapping) and "input_ids" in example:
            return self._tokens(torch.as_tensor(example["input_ids"]).ravel(), token_scores, token_mask)
        if isinstance(example, (tuple, list)) and example and not isinstance(example[0], (int, float, str)):
            # An (input, target, ...) pair: show the input, mention the rest.
            shown = self(example[0], token_scores, token_mask)
            rest = ", ".join(_short_repr(part) for part in example[1:])
            shown.text = f"{shown.text}  (target: {rest})" if rest else shown.text
            return shown
        if _is_image(example):
            shape = "x".join(map(str, example.shape))
            return RenderedExample(text=f"image {shape}", image=_to_uint8_image(example))
        if _is_token_ids(example):
            return self._tokens(example, token_scores, token_mask)
        return RenderedExample(text=_short_repr(example))

    def _tokens(
        self, ids: torch.Tensor, token_scores: Optional[torch.Tensor], token_mask: Optional[torch.Tensor]
    ) -> RenderedExample:
        id_list = ids[: self.max_tokens].tolist()
        if self.decode is not None:
            tokens = [str(t) for t in self.decode(id_list)]
            if len(tokens) != len(id_list):
                raise ValueError(f"decode returned {len(tokens)} strings for {len(id_list)} token ids")
            text = "".join(tokens)
        else:
            tokens = [f"{t} " for t in id_list]
            text = " ".join(map(str, id_list))
        return RenderedExample(text=text, html=highlight_tokens(tokens, token_scores, token_mask))


def render_example(
    renderer: ExampleRenderer,
    example: Any,
    token_scores: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> RenderedExample:
    """Call ``renderer`` and normalise its answer (a user renderer may return a plain string)."""
    rendered = renderer(example, token_scores=token_scores, token_mask=token_mask)
    if isinstance(rendered, str):
        return RenderedExample(text=rendered)
    if not isinstance(rendered, RenderedExample):
        raise TypeError(f"a renderer must return a RenderedExample or a str, got {type(rendered).__name__}")
    return rendered
