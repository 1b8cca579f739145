"""Resume a trainable-only checkpoint at another parallel layout (TP, PP, VPP, DP, distributed optimizer or not).

Each rank file also stores its optimizer state by parameter name (``optimizer_named``: the fp32 main parameter,
Adam's ``exp_avg`` / ``exp_avg_sq`` and ``step``, whole per TP/PP shard, gathered over the distributed optimizer's
data-parallel shards) and the layer range of each model chunk. At another layout every rank reads all rank files
(trainable state only: megabytes), merges weights and moments into the full (TP=1, PP=1) naming with
``sharding.merge_state_dicts`` and takes its own TP slice of each (``chat.tp_slice``: the vocabulary rows cut to
the real vocabulary and padded for its TP size), so the moments are resharded exactly like their parameters.

megatron-core's ``dist_checkpointing`` is not used: in 0.16.1 the modality-split linears describe their TP-split
``image_weight`` as replicated, so a checkpoint would keep TP rank 0's half only.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from megatron_visualchat.checkpoint.chat import tp_slice
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.sharding import global_layer_name, merge_state_dicts, stage_layer_range

# Per-parameter tensors shaped like the parameter (resharded with it); anything else (``step``) is copied.
SHARDED_FIELDS = ("param", "exp_avg", "exp_avg_sq")


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_params(part) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, Optional[range]]]:
    """(model parameter, the main parameter the inner optimizer updates, the flat range of the model parameter it
    holds: None for the whole) for megatron's three optimizer wrappers."""
    if isinstance(part, DistributedOptimizer):
        for model_param, (group, order) in part.model_param_group_index_map.items():
            r = part._get_model_param_range_map(model_param)["param"]
            yield model_param, part.optimizer.param_groups[group]["params"][order], range(r.start, r.end)
    elif hasattr(part, "float16_groups"):  # Float16OptimizerWithFloat16Params: fp32 copies of bf16/fp16 params
        for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups):
            yield from ((p, main, None) for p, main in zip(model_group, main_group))
        yield from ((p, p, None) for group in part.fp32_from_fp32_groups for p in group)
    elif part.optimizer is not None:  # FP32Optimizer
        yield from ((p, p, None) for group in part.optimizer.param_groups for p in group["params"])


def _names(chunks: list) -> dict:
    """model parameter -> (chunk index, name)."""
    return {p: (c, n) for c, model in enumerate(unwrap_model(chunks)) for n, p in model.named_parameters()}


def layer_ranges(chunks: list) -> list[range]:
    """The global decoder layers of each of this rank's model chunks."""
    pp_rank = ps.get_pipeline_model_parallel_rank()
    return [stage_layer_range(m.cfg.llm, m.cfg.parallel, pp_rank, vp) for vp, m in enumerate(unwrap_model(chunks))]


def named_optimizer_state(chunks: list, optimizer) -> Optional[list[dict]]:
    """Collective over data-parallel ranks with the distributed optimizer. Per chunk, ``{name: {"param",
    "exp_avg", "exp_avg_sq", "step", ...}}`` with whole (this TP/PP shard's) tensors, on data-parallel rank 0
    (None elsewhere); parameters the optimizer has not stepped yet have no entry."""
    names = _names(chunks)
    shapes = {key: p.shape for p, key in names.items()}
    out = [dict() for _ in unwrap_model(chunks)]
    for part in _parts(optimizer):
        pieces = {}  # (chunk, name) -> [(flat range, state)]
        for model_param, main, flat in _main_params(part):
            state = part.optimizer.state.get(main, {})
            if not state:
                continue
            tensors = {"param": main.detach(), **state}
            pieces.setdefault(names[model_param], []).append(
                (flat, {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in tensors.items()}))
        if isinstance(part, DistributedOptimizer):
            group = part.data_parallel_group
            gathered = [None] * group.size() if group.rank() == 0 else None
            dist.gather_object(pieces, gathered, dst=dist.get_global_rank(group, 0), group=group)
            if group.rank() != 0:
                continue
            pieces = {}
            for rank_pieces in gathered:
                for key, items in rank_pieces.items():
                    pieces.setdefault(key, []).extend(items)
        for (chunk, name), items in pieces.items():
            out[chunk][name] = _assemble(items, shapes[(chunk, name)])
    return out if ps.get_data_parallel_rank(with_context_parallel=True) == 0 else None


def _assemble(items: list, shape: torch.Size) -> dict:
    """One parameter's state from its data-parallel shards (flat ranges of the parameter)."""
    if len(items) == 1 and items[0][0] is None:
        return items[0][1]
    state = {k: v for k, v in items[0][1].items() if k not in SHARDED_FIELDS}
    for key in SHARDED_FIELDS:
        full = torch.empty(shape.numel(), dtype=items[0][1][key].dtype)
        covered = 0
        for flat, shard in items:
            full[flat.start:flat.stop] = shard[key].reshape(-1)
            covered += len(flat)
        if covered != shape.numel():
            raise CheckpointError(f"optimizer state of a parameter of shape {tuple(shape)} covers {covered} "
                                  "elements only: the data-parallel shards do not add up")
        state[key] = full.view(shape)
    return state


def merge_rank_states(states: list[tuple[int, int, dict]], saved_tp: int) -> tuple[dict, dict]:
    """Full (TP=1, PP=1) trainable weights and per-parameter optimizer state from every saved rank file's state
    (``(tp_rank, pp_rank, state)``)."""
    weight_shards, field_shards, other = [], {k: [] for k in SHARDED_FIELDS}, []
    for tp_rank, pp_rank, state in states:
        named = state["optimizer_named"] or [{} for _ in state["model"]]
        for (start, stop), weights, opt in zip(state["layers"], state["model"], named):
            layers = range(start, stop)
            weight_shards.append((tp_rank, pp_rank, layers, weights))
            for key in SHARDED_FIELDS:
                field_shards[key].append((tp_rank, pp_rank, layers, {n: s[key] for n, s in opt.items()}))
            if tp_rank == 0:  # equal on every TP rank (``step``)
                other.append((layers, {n: {k: v for k, v in s.items() if k not in SHARDED_FIELDS}
                                       for n, s in opt.items()}))
    fields = {key: merge_state_dicts(shards, saved_tp) for key, shards in field_shards.items()}
    optim = {name: {key: fields[key][name] for key in SHARDED_FIELDS} for name in fields["param"]}
    for layers, rest in other:
        for name, values in rest.items():
            optim[global_layer_name(name, layers)].update(values)
    return merge_state_dicts(weight_shards, saved_tp), optim


def local_state(weights: dict, optim: dict, chunks: list, vocab_size: int) -> tuple[list[dict], list[dict]]:
    """This rank's trainable weights and optimizer state, per model chunk, from the full ones: its layers, its TP
    shard, the vocabulary rows padded for its TP size. With tied embeddings and PP > 1 the last stage's
    ``output_layer.weight`` is a copy of the embedding (so are its moments: megatron all-reduces their grads)."""
    tp = ps.get_tensor_model_parallel_world_size()
    local_weights, local_optim = [], []
    for model, layers in zip(unwrap_model(chunks), layer_ranges(chunks)):
        padded = model.cfg.llm.padded_vocab_size(tp)
        lw, lo = {}, {}
        for name in _trainable_names(model):
            full = global_layer_name(name, layers)
            if full not in weights and is_tied_copy(full, model):
                full = full.replace("output_layer", "embedding.word_embeddings")
            if full not in weights:
                raise CheckpointError(f"the checkpoint holds no {full}, which this run trains")
            lw[name] = tp_slice(full, weights[full], vocab_size, padded)
            if full in optim:
                lo[name] = {k: tp_slice(full, v, vocab_size, padded) if k in SHARDED_FIELDS else v
                            for k, v in optim[full].items()}
        local_weights.append(lw)
        local_optim.append(lo)
    return local_weights, local_optim


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def global_trainable_names(chunks: list) -> set[str]:
    """Collective: the full-naming names of every trainable parameter over all ranks (without the last stage's
    copy of tied embeddings)."""
    mine = {global_layer_name(n, layers) for model, layers in zip(unwrap_model(chunks), layer_ranges(chunks))
            for n in _trainable_names(model)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    model = unwrap_model(chunks)[0]
    return {n for names in everyone for n in names if not is_tied_copy(n, model)}


def is_tied_copy(name: str, model) -> bool:
    return name.endswith("output_layer.weight") and not model.cfg.llm.untie_embeddings


def set_named_optimizer_state(chunks: list, optimizer, local: list[dict], group_step: Optional[int]) -> None:
    """Load per-parameter state (``local``: per chunk, this rank's shard of each parameter's state, as
    ``named_optimizer_state`` returns it) into megatron's main parameters and the inner optimizer; each
    data-parallel rank of the distributed optimizer takes its flat range. ``group_step``: the step count of
    optimizers that keep it per param group (Apex / Transformer-Engine FusedAdam) rather than per parameter."""
    names = _names(chunks)
    for part in _parts(optimizer):
        for group in part.optimizer.param_groups if part.optimizer is not None else ():
            if "step" in group and group_step is not None:
                group["step"] = group_step
        for model_param, main, flat in _main_params(part):
            chunk, name = names[model_param]
            saved = local[chunk].get(name)
            if saved is None:
                continue
            state = {}
            for key, value in saved.items():
                if key in SHARDED_FIELDS:
                    value = value.reshape(-1)[flat.start:flat.stop] if flat is not None else value
                    value = value.reshape(main.shape).to(main.dtype)
                state[key] = value.clone() if torch.is_tensor(value) else value
            with torch.no_grad():
                main.copy_(state.pop("param"))
            part.optimizer.state[main] = state
