"""LoRA adapters as layer-spec modules, tensor-parallel, and their merge back into the weights they adapt.

An adapted linear computes ``W x + s * B A dropout(x)`` with ``s = alpha / rank``, ``A [rank, in]`` kaiming-uniform
(as PEFT) and ``B [out, rank]`` zero, so step 0 is the base model exactly. The base layer's state-dict keys stay
(a converted LLaMA checkpoint loads unchanged); the adapters add ``<linear>.lora_a`` / ``.lora_b``.

Tensor parallelism: an adapter is a rank-r bottleneck, sharded so that the wide matrix follows the base weight.

- column-parallel base (``linear_qkv``, ``linear_fc1``; W split by output rows): A replicated, B ``[out/TP, r]``
  split by rows like W. ``h = A x`` goes through ``copy_to_tensor_model_parallel_region`` (megatron's "f"), whose
  backward all-reduces ``dh`` ([tokens, r]): every rank gets the full gradient of A and the same input gradient.
- row-parallel base (``linear_proj``, ``linear_fc2``; W split by input columns): A ``[r, in/TP]`` split by columns,
  B replicated. The partial ``h`` of each rank is summed by ``reduce_from_tensor_model_parallel_region`` ("g"),
  one all-reduce of [tokens, r] beside the base's [tokens, out]. Adding ``B h_partial`` to the base's partial
  output before its all-reduce would save that small forward collective, but every rank would then hold only its
  own part of B's gradient and need an all-reduce of [out, r] in backward instead.

The split parameter of each pair carries megatron's tensor-parallel attributes (gradient norm, clipping); the
replicated one is counted on TP rank 0. ``checkpoint/sharding.SPLIT_RULES`` splits them the same way.

Sequence parallelism (the column input and the row output are sequence shards): the column side all-gathers
``h = A x_shard`` ([tokens/TP, r] per rank; backward reduce-scatters), the row side reduce-scatters the partial
``h`` instead of all-reducing it, so each collective stays rank-sized. The replicated matrix (column A, row B) then
sees only its rank's tokens: it is flagged ``sequence_parallel`` and ``finalize_model_grads`` sums its gradient over
TP, as for the norms. Dropout on a sequence shard draws from the rank's own stream.

Modality-split projections (``mmca/split_linear.py``) get a second pair, ``image_lora_a`` / ``image_lora_b``,
adapting ``image_weight``: image tokens take the image adapter, the others the text one. With split ``kv`` the
image tokens' Q rows are the text weight's, so they take the text adapter's Q rows. Vision encoders get
``LoraLinear``, a plain ``nn.Linear`` with the same two parameters, in their transformer blocks.

``merge_lora`` folds every adapter into its weight, ``W + s * B A``: the state dict of the same model built without
LoRA, which the chat checkpoint holds (loading it needs no LoRA code). ``fold_adapters`` does the same at load time
for an adapter file (``checkpoint/adapters.py``).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from megatron_visualchat.config import LORA_PAIRS, ConfigError, LoraConfig, VisualChatConfig
from megatron_visualchat.model.mmca.split_linear import (
    ModalitySplitColumnParallelLinear,
    ModalitySplitRowParallelLinear,
)

_LORA_NAMES = {name for _, a, b in LORA_PAIRS for name in (a, b)}


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _LORA_NAMES


def _lora_a(rank: int, fan_in: int, like: torch.Tensor, *, initialize: bool = True,
            part: Optional[tuple[int, int]] = None) -> nn.Parameter:
    """A ``[rank, fan_in]``, or column slice ``part = (index, count)`` of it. Kaiming-uniform over the full fan-in
    (PEFT's init), drawn on CPU from the default generator, which tensor-parallel ranks share: replicas agree and
    slices come from one matrix. Left zero on the meta device or without ``initialize``."""
    index, count = part or (0, 1)
    a = torch.zeros(rank, fan_in // count, dtype=like.dtype, device=like.device)
    if initialize and like.device.type != "meta":
        full = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        a.copy_(full.chunk(count, dim=1)[index])
    return nn.Parameter(a)


def fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` in fp32, returned in W's dtype (any consistent TP slices: a column shard's B rows with the
    full A, or a row shard's A columns with the full B)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


class _TensorParallelLora:
    """The adapter half of the four megatron LoRA linears (mixed in before the base class)."""

    split_input: bool  # row-parallel bases: the input (and so A) is split over the TP ranks

    def __init__(self, input_size: int, output_size: int, *, config, lora_rank: int, lora_alpha: float,
                 lora_dropout: float = 0.0, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._add_adapters(lora_rank, lora_alpha, lora_dropout)

    def _add_adapters(self, rank: int, alpha: float, dropout: float) -> None:
        self.lora_scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_pairs = tuple(p for p in LORA_PAIRS if getattr(self, p[0], None) is not None)
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        for weight_name, a_name, b_name in self.lora_pairs:
            weight = getattr(self, weight_name)
            out_local, in_local = weight.shape
            a = _lora_a(rank, in_local * tp if self.split_input else in_local, weight,
                        initialize=self.config.perform_initialization, part=(tp_rank, tp) if self.split_input else None)
            b = nn.Parameter(torch.zeros(out_local, rank, dtype=weight.dtype, device=weight.device))
            set_tensor_model_parallel_attributes(a if self.split_input else b, is_parallel=True,
                                                 dim=1 if self.split_input else 0, stride=1)
            (b if self.split_input else a).sequence_parallel = self.sequence_parallel  # read by finalize_model_grads
            setattr(self, a_name, a)
            setattr(self, b_name, b)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.lora_dropout.p):
            return x
        if not (self.split_input or self.sequence_parallel):  # the same input on every TP rank: the shared
            return self.lora_dropout(x)  # default generator, the same mask
        with get_cuda_rng_tracker().fork():  # each rank's own input columns or sequence shard: its own stream
            return self.lora_dropout(x)

    def _hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A x`` as every TP rank needs it (see the module docstring), [s, b, rank]; with sequence parallelism
        the full sequence on the column side, this rank's output shard on the row side."""
        h = F.linear(self._dropped(x), a)
        if self.split_input:
            if self.sequence_parallel:
                return reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            return reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        return copy_to_tensor_model_parallel_region(h, group=self.tp_group)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_scale * F.linear(self._hidden(x, self.lora_a), self.lora_b)

    def _routed_delta(self, x: torch.Tensor, out_routing) -> torch.Tensor:
        """Modality-split layers: text tokens through the text adapter, image tokens through the image one (one
        collective for both). Without image tokens the image adapter still gets a defined zero gradient.
        ``self.routing`` (the whole sequence, alike on every TP rank) picks the path, so every rank joins the same
        collective; ``out_routing`` indexes the adapter's output tokens (a sequence shard on a sequence-parallel
        row side)."""
        if self.routing is None or not self.routing.any_image:
            return self._delta(x) + 0.0 * (self.image_lora_a.sum() + self.image_lora_b.sum())
        rank = self.lora_a.shape[0]
        h = self._hidden(x, torch.cat([self.lora_a, self.image_lora_a]))
        s, b, _ = h.shape
        h = h.reshape(s * b, 2 * rank)
        h_text, h_image = h[:, :rank], h[:, rank:]
        txt, img = out_routing.text_idx, out_routing.image_idx
        delta = h.new_zeros(s * b, self.lora_b.shape[0])
        delta = delta.index_copy(0, txt, F.linear(h_text[txt], self.lora_b))
        delta = delta.index_copy(0, img, self._image_rows(h_text[img], h_image[img]))
        return self.lora_scale * delta.view(s, b, -1)

    def _image_rows(self, h_text: torch.Tensor, h_image: torch.Tensor) -> torch.Tensor:
        """Image tokens' adapter output (before scaling) when the image weight covers all output rows."""
        return F.linear(h_image, self.image_lora_b)


class LoraColumnParallelLinear(_TensorParallelLora, ColumnParallelLinear):
    split_input = False

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        return out + self._delta(input_), bias


class LoraRowParallelLinear(_TensorParallelLora, RowParallelLinear):
    split_input = True

    def forward(self, input_: torch.Tensor):
        out, bias = super().forward(input_)
        return out + self._delta(input_), bias


class LoraModalitySplitColumnParallelLinear(_TensorParallelLora, ModalitySplitColumnParallelLinear):
    split_input = False

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        return out + self._routed_delta(input_, self.routing), bias

    def _image_rows(self, h_text: torch.Tensor, h_image: torch.Tensor) -> torch.Tensor:
        image = F.linear(h_image, self.image_lora_b)
        if self.split == "qkv":
            return image
        # split "kv": per query group [q; k; v], Q from the text side (as image_full_weight does for the weights)
        n, hpg = h_text.shape[0], self.heads_per_group
        q = F.linear(h_text, self.lora_b).view(n, self.groups, hpg + 2, self.head_dim)[:, :, :hpg]
        kv = image.view(n, self.groups, 2, self.head_dim)
        return torch.cat([q, kv], dim=2).reshape(n, -1)


class LoraModalitySplitRowParallelLinear(_TensorParallelLora, ModalitySplitRowParallelLinear):
    split_input = True

    def forward(self, input_: torch.Tensor):
        out, bias = super().forward(input_)
        return out + self._routed_delta(input_, self.out_routing), bias


_LORA_CLASSES = {
    ColumnParallelLinear: LoraColumnParallelLinear,
    RowParallelLinear: LoraRowParallelLinear,
    ModalitySplitColumnParallelLinear: LoraModalitySplitColumnParallelLinear,
    ModalitySplitRowParallelLinear: LoraModalitySplitRowParallelLinear,
}


def lora_linear_spec(slot, lora: LoraConfig) -> ModuleSpec:
    """The LoRA version of a layer-spec linear slot (a megatron or modality-split linear class, or its spec)."""
    base = slot if isinstance(slot, ModuleSpec) else ModuleSpec(module=slot)
    return ModuleSpec(module=_LORA_CLASSES[base.module],
                      params={**base.params, "lora_rank": lora.rank, "lora_alpha": lora.alpha,
                              "lora_dropout": lora.dropout})


class LoraLinear(nn.Linear):
    """A vision block's ``nn.Linear`` with an adapter pair; keeps the wrapped layer's parameters (and keys)."""

    lora_pairs = (LORA_PAIRS[0],)

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora_scale = alpha / rank
        self.lora_a = _lora_a(rank, base.in_features, base.weight)
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def add_vision_lora(encoder: nn.Module, lora: LoraConfig) -> int:
    """Wrap the ``lora.vision_targets`` linears of the encoder's transformer blocks (timm's ``blocks.N.attn.qkv``,
    ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) in ``LoraLinear``; returns how many. Refuses a target the encoder's
    blocks do not have."""
    found = dict.fromkeys(lora.vision_targets, 0)
    for name, module in list(encoder.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in found and isinstance(module, nn.Linear) and ".blocks." in f".{parent_name}.":
            parent = encoder.get_submodule(parent_name)
            setattr(parent, attr, LoraLinear(module, lora.vision_rank, lora.alpha))
            if attr == "qkv" and hasattr(parent, "qkv_bias_separate"):
                # timm's EVA attention with q/v biases would call F.linear on qkv.weight, skipping the adapter
                parent.qkv_bias_separate = True
            found[attr] += 1
    missing = [target for target, n in found.items() if not n]
    if missing:
        raise ConfigError(f"lora.vision_targets {missing}: the vision encoder's blocks have no such linear "
                          f"(adaptable: {list(found)} where present)")
    return sum(found.values())


def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every adapter folded into the weight it adapts (``W + s * B A``, this rank's
    shards) and the adapter tensors dropped: the state dict of the same model built without LoRA. A model without
    adapters gives its plain state dict."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        for weight, a, b in getattr(module, "lora_pairs", ()):
            state[p + weight] = fold(state[p + weight], state.pop(p + a), state.pop(p + b), module.lora_scale)
    return state


def fold_adapters(model: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float) -> None:
    """Apply an adapter file's tensors (this rank's slices, names and shapes checked by the reader) to a model built
    without LoRA: each (A, B) pair folds into the weight it adapts with scale ``alpha / rank``; the other tensors
    (the run's other trainable parts) replace the model's."""
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if not is_lora_parameter(name):
                own[name].copy_(tensor)
        for weight, a_name, b_name in LORA_PAIRS:
            for name, a in tensors.items():
                if name.endswith(f".{a_name}"):
                    prefix = name[: -len(a_name)]
                    target = own[prefix + weight]
                    target.copy_(fold(target, a, tensors[prefix + b_name], alpha / a.shape[0]))


def count_lora_parameters(model: nn.Module) -> tuple[int, int]:
    """(decoder, vision encoder) adapter parameters of this rank as a share of one model replica: TP-split ones on
    every TP rank, replicated ones on TP rank 0 only, so the sums over a replica's ranks are the model's counts."""
    counts = [0, 0]
    for name, p in model.named_parameters():
        if is_lora_parameter(name) and param_is_not_tensor_parallel_duplicate(p):
            counts[name.startswith("vision.")] += p.numel()
    return counts[0], counts[1]


def decoder_lora_parameters(cfg: VisualChatConfig) -> int:
    """Closed form of the decoder's adapter parameters: ``rank x (in + out)`` per adapted linear and layer, image-side
    adapters of modality-split projections included."""
    llm, lora = cfg.llm, cfg.lora
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.head_dim, 2 * llm.query_groups * llm.head_dim
    split = cfg.attention.modality_split
    image_qkv = {"none": [], "kv": [(h, kv)], "qkv": [(h, q + kv)], "qkvo": [(h, q + kv)]}[split]
    shapes = {"qkv": [(h, q + kv)] + image_qkv, "proj": [(q, h)] * (2 if split == "qkvo" else 1),
              "fc1": [(h, 2 * f)], "fc2": [(f, h)]}
    return llm.num_layers * lora.rank * sum(i + o for t in lora.targets for i, o in shapes[t])


def lora_report(cfg: VisualChatConfig, decoder: int, vision: int) -> str:
    """The log line at train start: the counted adapter parameters (sums over a model replica) beside the decoder's
    closed form."""
    lora = cfg.lora
    text = f"LoRA adapters: {decoder + vision:,} trainable parameters (alpha {lora.alpha:g}); decoder: "
    text += (f"{decoder:,} (closed form {decoder_lora_parameters(cfg):,}), rank {lora.rank} on "
             f"{','.join(lora.targets)}" if lora.rank else "none")
    text += (f"; vision encoder: {vision:,}, rank {lora.vision_rank} on {','.join(lora.vision_targets)}"
             if lora.vision_rank else "; vision encoder: none")
    return text
