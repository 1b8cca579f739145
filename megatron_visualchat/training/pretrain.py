"""The training loop: build -> load -> (step, log, eval, save)* -> export. One readable function per phase.

``train(args)`` assumes torch.distributed and megatron-core's groups are up (``main`` brings them up through
``initialize_parallel``; tests call ``train`` inside their forked ranks).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist

from megatron_visualchat.config import VisualChatConfig
from megatron_visualchat.training import checkpointing
from megatron_visualchat.training.accuracy import answer_accuracy
from megatron_visualchat.training.arguments import model_config, parse_args
from megatron_visualchat.training.data_setup import build_loaders, load_tokenizer
from megatron_visualchat.training.metrics import MetricsLogger
from megatron_visualchat.training.optimizer import build_optimizer, build_scheduler, wrap_model
from megatron_visualchat.training.step import run_schedule, visualchat_forward_step


def build_model_chunks(cfg: VisualChatConfig, args, new_token_rows: tuple[int, ...] = ()) -> list:
    """This rank's VisualChatModel chunk(s) (several with virtual pipeline stages), trainable policy applied,
    base LLM weights loaded and image-side projections initialised from them. ``new_token_rows``: vocabulary
    rows of the tokenizer's added tokens (for ``trainable.new_token_rows_only``)."""
    from megatron_visualchat.model.mmca.split_linear import copy_text_weights_to_image
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
    recompute = {}
    if args.recompute_granularity:
        recompute = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                         recompute_num_layers=args.recompute_num_layers)
    chunks = []
    for vp_stage in stages:
        # Built in fp32; Float16Module (wrap_model) casts to bf16/fp16 and the optimizer keeps fp32 main params.
        model = VisualChatModel(cfg, params_dtype=torch.float32, vp_stage=vp_stage, transformer_overrides=recompute)
        model.config.params_dtype = model.config.pipeline_dtype = dtype
        model.config.bf16, model.config.fp16 = args.bf16, args.fp16
        if args.llm_load:
            _load_base_llm(model, args.llm_load)
            copy_text_weights_to_image(model)
        apply_trainable_policy(model, cfg.trainable, new_token_rows=new_token_rows)
        chunks.append(model)
    return chunks


def _load_base_llm(model, load_dir: str) -> None:
    """The converted LLaMA checkpoint fills the language model; only the image-side split projections (copied
    from the text weights next) may be absent from it."""
    from megatron_visualchat.checkpoint.hf_llama import CheckpointError
    from megatron_visualchat.checkpoint.legacy_format import load_megatron_checkpoint

    missing, unexpected = load_megatron_checkpoint(model.language_model, load_dir, strict=False)
    wrong = [k for k in missing if not k.endswith("image_weight") and not k.endswith("_extra_state")]
    if wrong or unexpected:
        raise CheckpointError(f"{load_dir} does not fit the language model: missing {wrong[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def _configure_schedule_hooks(chunks: list, optimizer, fp16: bool) -> None:
    """What Megatron-LM's training loop wires into the model config for the schedules."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.grad_scale_func = optimizer.scale_loss if fp16 else None


def _reduce_loss(loss_dicts: list[dict]) -> float:
    """Mean loss over microbatches and data-parallel ranks, available on every rank (only last-stage TP rank 0
    ranks contribute)."""
    from megatron.core import parallel_state as ps

    contributes = bool(loss_dicts) and ps.get_tensor_model_parallel_rank() == 0
    local = sum(float(d["lm loss"][0]) for d in loss_dicts) / max(len(loss_dicts), 1)
    t = torch.tensor([local if contributes else 0.0, 1.0 if contributes else 0.0], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1])


def _count_tokens(microbatches: list[dict]) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    tokens = sum(int((b["modality"] != 0).sum()) for b in microbatches) * dp
    image_tokens = sum(int((b["modality"] == 2).sum()) for b in microbatches) * dp
    return tokens, image_tokens


def evaluate(chunks: list, loader, args, num_microbatches: int, seq_length: int) -> float:
    for c in chunks:
        c.eval()
    losses = []
    with torch.no_grad():
        batches = loader.forever()
        for _ in range(args.eval_iters):
            mbs = [next(batches) for _ in range(num_microbatches)]
            out = run_schedule(chunks, mbs, num_microbatches=num_microbatches, seq_length=seq_length,
                               micro_batch_size=args.micro_batch_size, forward_step=visualchat_forward_step,
                               forward_only=True)
            losses.append(_reduce_loss(out))
    for c in chunks:
        c.train()
    return sum(losses) / len(losses)


def config_record(cfg: VisualChatConfig, args) -> dict:
    """What a checkpoint must agree on to be resumed (everything but the data-parallel size)."""
    model = dataclasses.asdict(cfg)
    model.pop("parallel")
    return {"model": model, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp,
            "pp_layers": list(cfg.parallel.pp_layers) if cfg.parallel.pp_layers else None, "dp": cfg.parallel.dp}


def train(args) -> dict:
    """Run training; returns {"losses": [...per step], "eval_losses"/"eval_accuracy": [...per eval], "iteration": n,
    ...} (same values on all ranks)."""
    from megatron.core import parallel_state as ps

    # 1. tokenizer and config (the tokenizer's added tokens may enlarge the vocabulary)
    tokenizer = load_tokenizer(args)
    cfg = model_config(args, dist.get_world_size(), vocab_size=tokenizer.vocab_size)
    dp = cfg.parallel.dp
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    # 2. model, DDP, optimizer, schedule
    chunks = wrap_model(build_model_chunks(cfg, args, tuple(tokenizer.added_tokens.values())),
                        use_distributed_optimizer=args.use_distributed_optimizer,
                        fp16=args.fp16, bf16=args.bf16)
    optimizer = build_optimizer(chunks, args)
    _configure_schedule_hooks(chunks, optimizer, args.fp16)
    record = config_record(cfg, args)

    # 3. resume
    load_dir = args.load or (args.save if checkpointing.latest_iteration(args.save) is not None else None)
    start = {"iteration": 0, "consumed_samples": 0}
    train_loader, eval_loader = build_loaders(args, cfg, tokenizer)
    train_iters = args.train_iters or math.ceil(args.train_epochs * len(train_loader.dataset) /
                                                args.global_batch_size)
    scheduler = build_scheduler(optimizer, args, train_iters)
    if load_dir and checkpointing.latest_iteration(load_dir) is not None:
        start = checkpointing.load_checkpoint(load_dir, chunks, optimizer, scheduler,
                                              distributed_optimizer=args.use_distributed_optimizer,
                                              config_record=record)
        train_loader.seek(start["consumed_samples"])
    if dist.get_rank() == 0 and args.save:
        tokenizer.save(os.path.join(args.save, "tokenizer"))

    # 4. loop
    seq_length = args.seq_length
    logger = MetricsLogger(enabled=dist.get_rank() == 0, total_iters=train_iters,
                           tensorboard_dir=args.tensorboard_dir, progress_bar=not args.no_progress_bar,
                           start_iter=start["iteration"])
    batches = train_loader.forever()
    losses, eval_losses, eval_accuracy = [], [], []
    iteration = start["iteration"]
    while iteration < train_iters:
        microbatches = [next(batches) for _ in range(num_microbatches)]
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        loss_dicts = run_schedule(chunks, microbatches, num_microbatches=num_microbatches, seq_length=seq_length,
                                  micro_batch_size=args.micro_batch_size, forward_step=visualchat_forward_step)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=args.global_batch_size)
        iteration += 1
        loss = _reduce_loss(loss_dicts)
        losses.append(loss)
        tokens, image_tokens = _count_tokens(microbatches)
        logger.step(iteration, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, tokens=tokens,
                    image_tokens=image_tokens, skipped=Counter(train_loader.skipped),
                    log=iteration % args.log_interval == 0)
        if eval_loader is not None and (iteration % args.eval_interval == 0 or iteration == train_iters):
            eval_losses.append(evaluate(chunks, eval_loader, args, num_microbatches, seq_length))
            eval_accuracy.append(answer_accuracy(chunks, eval_loader, num_microbatches=num_microbatches,
                                                 seq_length=seq_length, micro_batch_size=args.micro_batch_size,
                                                 max_batches=args.eval_accuracy_iters))
            logger.eval(iteration, eval_losses[-1], eval_accuracy[-1])
        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if args.save and (exiting or iteration == train_iters or
                          (args.save_interval and iteration % args.save_interval == 0)):
            checkpointing.save_checkpoint(args.save, iteration, chunks, optimizer, scheduler,
                                          consumed_samples=train_loader.consumed_samples,
                                          distributed_optimizer=args.use_distributed_optimizer,
                                          config_record=record, keep_last=args.keep_last)
        if exiting:
            break
    logger.close()

    # 5. export
    if args.export_dir:
        from megatron_visualchat.training.export import export_trained

        export_trained(chunks, cfg, tokenizer, args.export_dir)
    return {"losses": losses, "eval_losses": eval_losses, "eval_accuracy": eval_accuracy, "iteration": iteration,
            "skipped": dict(train_loader.skipped), "dp": dp, "pp_rank": ps.get_pipeline_model_parallel_rank()}


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_visualchat.parallel import destroy_parallel, initialize_parallel

    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    from megatron_visualchat.config import ConfigError, ParallelConfig

    if world % (tp * pp):
        raise ConfigError(f"{world} processes cannot be split into tensor-parallel {tp} x pipeline-parallel {pp} "
                          "groups: launch a multiple of tp x pp processes")
    initialize_parallel(ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp),
                                       vpp=args.virtual_pipeline_model_parallel_size,
                                       pp_layers=args.pipeline_layers), args.seed)
    try:
        train(args)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
