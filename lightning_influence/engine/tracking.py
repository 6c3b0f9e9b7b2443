"""Which modules are tracked, and the hooks that capture their inputs and output gradients.

Every tracked layer is seen as a matrix ``W`` of shape ``[d_out, d_in]`` acting on token vectors,
with the bias as an extra input column fed by a constant 1. Activations come out as
``[B, T, d_in]`` and output gradients as ``[B, T, d_out]``, where ``T`` is the token axis: the
flattened leading dimensions of a linear layer, or the spatial positions of a convolution.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BYTES_PER_FLOAT = 4

# Names PyTorch's module wrappers insert into module paths: FullyShardedDataParallel (FSDP1) and
# checkpoint_wrapper (activation checkpointing, CPU offload). Layers keep their unwrapped names, so a
# configuration, saved statistics and factors mean the same layers with and without the wrappers.
WRAPPED_MODULE_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped_name(name: str) -> str:
    """A module's name in the model without FSDP1 / checkpoint wrappers."""
    return ".".join(part for part in name.split(".") if part not in WRAPPED_MODULE_NAMES)


def named_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{unwrapped name: module}``; where a wrapper and the module it wraps share a name, the
    module (it comes after its wrapper in ``named_modules``)."""
    return {unwrapped_name(name): module for name, module in model.named_modules()}


def model_class(model: nn.Module) -> type:
    """The class of the user's model inside FSDP1 / checkpoint wrappers and FSDP2's subclass
    (``fully_shard`` turns a ``Net`` into an ``FSDPNet``)."""
    for name in WRAPPED_MODULE_NAMES:
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return model_class(inner)
    if not torch.distributed.is_available():  # a PyTorch build without FSDP
        return type(model)
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer storing its weight as ``[d_in, d_out]``, with ``nf = d_out``
    (duck-typed by class name, also under FSDP2, which makes it a subclass ``FSDPConv1D``)."""
    named_conv1d = any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
    return named_conv1d and isinstance(getattr(module, "nf", None), int)


def _layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


@dataclass
class TrackedLayer:
    """A module whose weight is treated as one Kronecker-factored curvature block."""

    name: str
    module: nn.Module
    kind: str

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    # Sizes come from the module's configuration, never from its weight: under FSDP the weight is a
    # shard (a DTensor, or a flat view) between forward passes.
    @property
    def d_out(self) -> int:
        module = self.module
        if self.kind == "conv2d":
            return int(module.out_channels)
        return int(module.nf if self.kind == "conv1d" else module.out_features)

    @property
    def d_in(self) -> int:
        """Input dimension including the bias column."""
        module = self.module
        if self.kind == "conv2d":
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif self.kind == "conv1d":  # a Conv1D without nx (older transformers): the weight's (FSDP2: global) shape
            fan_in = getattr(module, "nx", None) or module.weight.shape[0]
        else:
            fan_in = module.in_features
        return int(fan_in) + int(self.has_bias)

    @property
    def factor_bytes(self) -> int:
        """Memory of this layer's statistics: A, S and the eigenvalue matrix, in float32."""
        return BYTES_PER_FLOAT * (self.d_in**2 + self.d_out**2 + self.d_in * self.d_out)

    def activations(self, inputs: Tensor) -> Tensor:
        """Layer input -> ``[B, T, d_in]`` (unfolded patches for convolutions, bias column last)."""
        if self.kind == "conv2d":
            conv = self.module
            if isinstance(conv.padding, str):
                raise ValueError(f"layer {self.name!r}: string padding ({conv.padding!r}) is not supported")
            patches = F.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
            acts = patches.transpose(1, 2)  # [B, L, C*kh*kw]
        else:
            acts = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        if self.has_bias:
            acts = torch.cat([acts, acts.new_ones(acts.shape[:-1] + (1,))], dim=-1)
        return acts

    @property
    def input_reading(self) -> tuple:
        """What turns the layer's input into its activation rows: layers reading the same input
        tensor with equal readings have equal activations (and one activation covariance)."""
        module = self.module
        if self.kind == "conv2d":
            return (self.kind, self.d_in, module.kernel_size, module.dilation, module.padding, module.stride)
        return (self.kind, self.d_in)

    def output_gradients(self, grad_output: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output -> ``[B, T, d_out]``."""
        if self.kind == "conv2d":
            return grad_output.flatten(2).transpose(1, 2)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])


class TrackingError(ValueError):
    """The requested set of tracked modules is invalid (unknown names, nothing trackable, ...)."""


def select_layers(
    model: nn.Module,
    layers: Optional[Sequence[str]] = None,
    exclude: Sequence[str] = (),
    max_layer_bytes: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    *,
    include: Optional[Sequence[str]] = None,
) -> List[TrackedLayer]:
    """Choose the layers to track.

    Args:
        model: the model.
        layers: module names or glob patterns (``"blocks.*.mlp.*"``); default: every trackable
            module with a trainable weight, except linear layers whose weight is tied to an
            embedding (the unembedding, which the paper leaves out). Patterns skip, and the default
            leaves out with a warning, the ``out_proj`` of ``nn.MultiheadAttention``: it is applied
            through ``F.linear``, so its hooks never fire; naming it exactly is refused.
        exclude: names or patterns removed from the selection.
        max_layer_bytes: layers whose statistics would exceed this are skipped with a warning.
        memory_budget_bytes: refuse (``TrackingError``) a selection whose statistics exceed this.

    The default selection warns when the trackable layers (before ``exclude`` and the size limit)
    hold under half of the model's trainable parameters (e.g. an LSTM with a linear head: only the
    head is tracked), naming what is left out. ``include`` is the former name of ``layers``.
    """
    if include is not None:
        warnings.warn("select_layers(include=...) is now select_layers(layers=...), the name every other "
                      "function and setting uses", DeprecationWarning, stacklevel=2)
        layers = include
    modules = named_layers(model)
    all_names = [n for n in modules if n]
    tied = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    unhookable = _bypassed_linears(modules)

    def trackable(name: str) -> bool:
        module = modules[name]
        weight = getattr(module, "weight", None)
        return (
            name not in unhookable
            and _layer_kind(module) is not None
            and isinstance(weight, Tensor)
            and weight.requires_grad
            and not (isinstance(module, nn.Conv2d) and module.groups != 1)
        )

    if layers is None:
        names = [n for n in all_names if trackable(n) and id(modules[n].weight) not in tied]
        _warn_if_mostly_untracked(model, [modules[n] for n in names])
    else:
        names = []
        for pattern in layers:
            matched = [n for n in all_names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise TrackingError(_unknown_name_message(pattern, all_names))
            exact = modules.get(pattern)
            if pattern in unhookable:
                raise TrackingError(
                    f"module {pattern!r} is the output projection of {unhookable[pattern]!r} (nn.MultiheadAttention), "
                    "which applies it through F.linear: its hooks never fire, so it cannot be tracked; "
                    "leave it out of layers"
                )
            if exact is not None and not trackable(pattern):
                raise TrackingError(
                    f"module {pattern!r} ({type(exact).__name__}) cannot be tracked: supported are nn.Linear, "
                    "nn.Conv2d (groups=1) and GPT-2 Conv1D layers with a trainable weight"
                )
            names.extend(n for n in matched if trackable(n) and n not in names)
    for pattern in exclude:
        if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in all_names):
            raise TrackingError(_unknown_name_message(pattern, all_names, what="exclude"))
        names = [n for n in names if not (n == pattern or fnmatch.fnmatchcase(n, pattern))]

    if include is None and unhookable:
        warnings.warn(
            f"not tracking {', '.join(sorted(unhookable))}: nn.MultiheadAttention applies its output projection "
            "through F.linear, which bypasses module hooks"
        )
    chosen = [TrackedLayer(n, modules[n], _layer_kind(modules[n])) for n in names]
    if max_layer_bytes is not None:
        too_big = [layer for layer in chosen if layer.factor_bytes > max_layer_bytes]
        if too_big:
            listing = ", ".join(f"{l.name} ({l.factor_bytes / 2**20:.3g} MiB)" for l in too_big)
            warnings.warn(f"skipping layers over the per-layer limit of {max_layer_bytes / 2**20:.3g} MiB: {listing}")
            chosen = [layer for layer in chosen if layer.factor_bytes <= max_layer_bytes]
    if not chosen:
        seen = Counter(type(m).__name__ for m in modules.values() if m is not model)
        listing = ", ".join(f"{k} x{v}" for k, v in seen.most_common()) or "none"
        frozen = [n for n in all_names if _layer_kind(modules[n]) is not None and not trackable(n)
                  and not getattr(modules[n].weight, "requires_grad", True)]
        hint = f"; frozen (requires_grad=False), so left out: {', '.join(frozen[:5])}" if frozen else ""
        raise TrackingError(
            "no trackable layer found (tracked: nn.Linear, nn.Conv2d, GPT-2 Conv1D with trainable weights, "
            f"not tied to an embedding); module types in this model: {listing}{hint}"
        )
    if memory_budget_bytes is not None:
        total = sum(layer.factor_bytes for layer in chosen)
        if total > memory_budget_bytes:
            costly = sorted(chosen, key=lambda l: -l.factor_bytes)[:5]
            listing = ", ".join(f"{l.name} ({l.factor_bytes / 2**20:.3g} MiB)" for l in costly)
            raise TrackingError(
                f"influence statistics need {total / 2**20:.3g} MiB, over the memory budget of "
                f"{memory_budget_bytes / 2**20:.3g} MiB; costliest layers: {listing}. Exclude some of them, "
                "set a per-layer limit, or raise the budget"
            )
    return chosen


def _bypassed_linears(modules: Dict[str, nn.Module]) -> Dict[str, str]:
    """``{linear layer name: owning attention's name}`` for the ``out_proj`` of every
    ``nn.MultiheadAttention``: PyTorch applies it with ``F.linear`` on its weight, never calling it."""
    return {f"{name}.out_proj": name for name, module in modules.items()
            if isinstance(module, nn.MultiheadAttention) and f"{name}.out_proj" in modules}


def _warn_if_mostly_untracked(model: nn.Module, trackable: Sequence[nn.Module]) -> None:
    """Warn when the trackable layers hold under half of the trainable parameters, naming the
    modules that hold the most of the rest: influence then describes only a part of the model."""
    tracked = {id(p) for module in trackable for p in module.parameters()}
    left_out: Counter = Counter()
    total = 0
    for name, module in named_layers(model).items():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                total += param.numel()
                if id(param) not in tracked:
                    left_out[f"{name or '(model)'} ({type(module).__name__})"] += param.numel()
    untracked = sum(left_out.values())
    if total and untracked > total / 2:
        listing = ", ".join(f"{what}: {count:,}" for what, count in left_out.most_common(5))
        warnings.warn(
            f"the tracked layers hold {100 * (total - untracked) / total:.0f}% of the trainable parameters; "
            f"influence sees only them (tracked: nn.Linear, nn.Conv2d, GPT-2 Conv1D; embeddings and the "
            f"unembedding are left out by default). Largest left out: {listing}"
        )


def layers_by_name(model: nn.Module, names: Sequence[str]) -> List[TrackedLayer]:
    """The tracked layers for known module names (e.g. restored from saved statistics)."""
    modules = named_layers(model)
    missing = [n for n in names if n not in modules or _layer_kind(modules[n]) is None]
    if missing:
        raise TrackingError(f"the model has no trackable modules named {missing[:5]}; "
                            "the statistics or factors come from a different model")
    return [TrackedLayer(n, modules[n], _layer_kind(modules[n])) for n in names]


def _unknown_name_message(pattern: str, names: Sequence[str], what: str = "include") -> str:
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{what}: no module named or matching {pattern!r} in the model{hint}"


def input_key(tensor: Tensor, layer: TrackedLayer) -> tuple:
    """Identifies a layer's input tensor object and how the layer reads it. Tensors with equal values
    but other memory never match; neither does a tensor changed in place in between (its version)."""
    try:
        version = tensor._version
    except RuntimeError:  # an inference-mode tensor: no version counter (and no in-place change outside it)
        version = -1
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()),
            version, layer.input_reading)


def group_by_key(keyed: Sequence[tuple]) -> List[List[str]]:
    """``[(name, key or None)]`` -> the groups (two or more names, in order) with equal keys."""
    groups: Dict[tuple, List[str]] = {}
    for name, key in keyed:
        if key is not None:
            groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


GradientCallback = Callable[[TrackedLayer, Tensor, Tensor], None]


class LayerTracker:
    """Forward hooks recording each tracked layer's input and output during a forward pass.

    Two ways to get the output gradients:

    * the engine's own passes call :meth:`capture` around a forward and then differentiate w.r.t.
      :meth:`outputs` with ``torch.autograd.grad`` (no parameter gradient is formed, ``.grad`` is
      never touched);
    * with ``on_gradient`` set, a tensor hook on each output calls
      ``on_gradient(layer, activations, output_gradients)`` during the user's own backward pass
      (the callback's way of collecting statistics from training steps).
    """

    def __init__(self, layers: Sequence[TrackedLayer], on_gradient: Optional[GradientCallback] = None,
                 reach: Sequence[TrackedLayer] = ()) -> None:
        self.layers = list(layers)
        # Further layers whose outputs the engine's backward passes differentiate too, their results
        # dropped: with sharded factors every process tracks its own layers but reaches every tracked
        # layer, so that a sharded model's backward passes issue the same collectives on every process.
        names = {layer.name for layer in self.layers}
        self.reach = [layer for layer in reach if layer.name not in names]
        self.on_gradient = on_gradient
        self.active = False
        self.token_mask: Optional[Tensor] = None  # [B, T] for the batch being processed
        # Set while the user's backward runs: a forward then is activation checkpointing's
        # recomputation, recorded only for a layer whose first forward ran without gradients (reentrant).
        self.in_backward = False
        self._inputs: Dict[str, List[Tensor]] = {}
        self._outputs: Dict[str, List[Tensor]] = {}
        # Per layer, the identity of each recorded input: the tensor's memory, layout and version
        # (in-place changes bump it). Compared while the tensor is held, so the memory is not reused.
        self._input_keys: Dict[str, List[tuple]] = {}
        self._handles: list = []

    # -- hook management ----------------------------------------------------------------------
    def attach(self) -> "LayerTracker":
        if not self._handles:
            for layer in self.layers + self.reach:
                self._handles.append(layer.module.register_forward_hook(self._make_hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def __enter__(self) -> "LayerTracker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        self._inputs = {layer.name: [] for layer in self.layers + self.reach}
        self._outputs = {layer.name: [] for layer in self.layers + self.reach}
        self._input_keys = {layer.name: [] for layer in self.layers + self.reach}

    def _make_hook(self, layer: TrackedLayer):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            if not self.active or not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if self.in_backward and self._inputs[layer.name]:
                return  # activation checkpointing recomputing a forward already recorded
            activation = inputs[0].detach()
            self._inputs[layer.name].append(activation)
            self._input_keys[layer.name].append(input_key(inputs[0], layer))
            self._outputs[layer.name].append(output)
            if self.on_gradient is not None and output.requires_grad:
                mask = self.token_mask

                def on_grad(grad: Tensor) -> None:
                    self.on_gradient(layer, self.masked(layer.activations(activation), mask),
                                     self.masked(layer.output_gradients(grad), mask))

                output.register_hook(on_grad)

        # Under torch.compile the hook runs eagerly (a graph break): it sees real tensors and
        # registers its gradient hook on them, exactly as without compilation.
        return torch.compiler.disable(hook)

    @contextmanager
    def capture(self, token_mask: Optional[Tensor] = None) -> Iterator["LayerTracker"]:
        """Record the layers' inputs/outputs of the forward passes run inside the block."""
        self.reset()
        self.token_mask = token_mask
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    # -- access to what was recorded ----------------------------------------------------------
    def call_count(self, name: str) -> int:
        """How often layer ``name``'s hook fired since the last reset (cheap: on the hot path)."""
        return len(self._inputs[name])

    def call_counts(self) -> Dict[str, int]:
        return {name: len(calls) for name, calls in self._inputs.items()}

    def check_single_calls(self) -> None:
        """Raise naming every layer whose hook did not fire exactly once in the last forward."""
        counts = self.call_counts()
        never = [n for n, c in counts.items() if c == 0]
        twice = [f"{n} (x{c})" for n, c in counts.items() if c > 1]
        problems = []
        if never:
            problems.append(
                f"never called in the forward pass: {', '.join(never)} (e.g. nn.MultiheadAttention.out_proj is "
                "applied through F.linear and bypasses hooks); exclude them"
            )
        if twice:
            problems.append(
                f"called more than once per forward pass: {', '.join(twice)} (shared weights or activation "
                "checkpointing); exclude them or untie them"
            )
        if problems:
            raise TrackingError("cannot track these layers: " + "; ".join(problems))

    def input_key(self, name: str) -> Optional[tuple]:
        """The identity of layer ``name``'s single input in the last forward (``None``: not exactly one)."""
        keys = self._input_keys.get(name, [])
        return keys[0] if len(keys) == 1 else None

    def input_groups(self) -> List[List[str]]:
        """Tracked layers that read the same input tensor in the last forward, with the same reading
        (:attr:`TrackedLayer.input_reading`): groups of two or more names, in tracking order. Their
        activations are equal, so they share one activation covariance (q/k/v, gate/up projections)."""
        return group_by_key([(layer.name, self.input_key(layer.name)) for layer in self.layers])

    def outputs(self) -> List[Tensor]:
        """The single output of each layer in the last forward (call :meth:`check_single_calls` first)."""
        return [self._outputs[layer.name][0] for layer in self.layers]

    def reach_outputs(self) -> List[Tensor]:
        """The outputs of the ``reach`` layers in the last forward, differentiated along with :meth:`outputs`."""
        return [self._outputs[layer.name][0] for layer in self.reach]

    def activations(self, layer: TrackedLayer) -> Tensor:
        return self.masked(layer.activations(self._inputs[layer.name][0]), self.token_mask)

    @staticmethod
    def masked(values: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Zero padded token positions (when the layer's token axis is the sequence axis)."""
        if mask is None or values.shape[1] != mask.shape[1]:
            return values
        return values * mask.to(values.dtype).unsqueeze(-1)
