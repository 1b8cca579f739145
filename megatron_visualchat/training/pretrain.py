"""The training loop: build -> load -> (step, log, eval, save)* -> export. One readable function per phase.

``train(run)`` takes the parsed ``TrainingConfig`` and assumes torch.distributed and megatron-core's groups are up
(``main`` brings them up through ``initialize_parallel``; tests call ``train`` inside their forked ranks).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import unwrap_model

from megatron_visualchat.checkpoint import training_state
from megatron_visualchat.checkpoint.adapters import check_adapters_dir, save_adapters
from megatron_visualchat.checkpoint.chat import check_export_dir, save_chat_checkpoint
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse_cross import load_towers
from megatron_visualchat.checkpoint.init_from import load_weights
from megatron_visualchat.checkpoint.legacy_format import load_megatron_checkpoint
from megatron_visualchat.config import JAM_CROSS, VisualChatConfig
from megatron_visualchat.model.image_tokenizer import parse_image_tokenizer_spec
from megatron_visualchat.model.jam_cross import JamCrossModel, apply_jam_cross_trainable
from megatron_visualchat.model.lora import count_lora_parameters, lora_report, merge_lora
from megatron_visualchat.model.mmca.split_linear import copy_text_weights_to_image
from megatron_visualchat.model.token_codes import MODALITY_IMAGE, MODALITY_PAD
from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy
from megatron_visualchat.parallel import destroy_parallel, initialize_parallel
from megatron_visualchat.training.accuracy import answer_accuracy
from megatron_visualchat.training.arguments import model_config, parallel_config, parse_args
from megatron_visualchat.training.data_setup import build_loaders, load_tokenizer
from megatron_visualchat.training.dry_run import dry_run
from megatron_visualchat.training.metrics import MetricsLogger
from megatron_visualchat.training.optimizer import build_optimizer, build_scheduler, wrap_model
from megatron_visualchat.training.run_config import TrainingConfig
from megatron_visualchat.training.step import modality_weighted_forward_step, run_schedule, visualchat_forward_step


def build_model_chunks(cfg: VisualChatConfig, run: TrainingConfig, new_token_rows: tuple[int, ...] = (),
                       new_output_rows: tuple[int, ...] = ()) -> list:
    """This rank's VisualChatModel chunk(s) (several with virtual pipeline stages), trainable policy applied,
    base LLM weights loaded and image-side projections initialised from them, then ``--init-from`` checkpoints
    loaded over them. ``new_token_rows``: vocabulary
    rows of the tokenizer's added tokens, ``new_output_rows``: output-layer rows of its image vocabulary (for
    ``trainable.new_token_rows_only``)."""
    prec = run.precision
    stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
    recompute = run.recompute.transformer_overrides()
    chunks = []
    for vp_stage in stages:
        # Built in fp32; Float16Module (wrap_model) casts to bf16/fp16 and the optimizer keeps fp32 main params.
        jam = cfg.fusion.kind == JAM_CROSS
        model = (JamCrossModel if jam else VisualChatModel)(cfg, params_dtype=torch.float32, vp_stage=vp_stage,
                                                            transformer_overrides=recompute)
        model.config.params_dtype = model.config.pipeline_dtype = prec.dtype
        model.config.bf16, model.config.fp16 = prec.bf16, prec.fp16
        if jam:  # a cross fusion (model/jam_cross.py): both towers from --llm-load, the fusion's weights trained
            if run.model.llm_load:
                load_towers(model, run.model.llm_load)
            apply_jam_cross_trainable(model, cfg.trainable)
            chunks.append(model)
            continue
        if run.model.llm_load:
            _load_base_llm(model, run.model.llm_load)
            copy_text_weights_to_image(model)
        apply_trainable_policy(model, cfg.trainable, new_token_rows=new_token_rows, new_output_rows=new_output_rows)
        chunks.append(model)
    for root in run.checkpoint.init_from:  # earlier runs' (a recipe's earlier stages') weights, later ones win
        iteration = load_weights(root, chunks, config_record(cfg, run))
        if dist.get_rank() == 0:
            print(f"--init-from {root}: weights of iteration {iteration} loaded", flush=True)
    return chunks


def _load_base_llm(model, load_dir: str) -> None:
    """The converted LLaMA checkpoint fills the language model; only the image-side split projections (copied
    from the text weights next) may be absent from it."""
    missing, unexpected = load_megatron_checkpoint(model.language_model, load_dir, strict=False)
    wrong = [k for k in missing if not k.endswith("image_weight") and not k.endswith("_extra_state")]
    if wrong or unexpected:
        raise CheckpointError(f"{load_dir} does not fit the language model: missing {wrong[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def _configure_schedule_hooks(chunks: list, optimizer, fp16: bool) -> None:
    """What Megatron-LM's training loop wires into the model config for the schedules. With
    ``--overlap-grad-reduce`` the interleaved schedule starts each chunk's gradient reduction as soon as that
    chunk's last backward is done (Megatron-LM's ``align_grad_reduce`` default); parameter all-gathers
    (``--overlap-param-gather``) are driven by DDP's forward pre-hooks, so no ``param_sync_func`` is set."""
    overlap_grad_reduce = chunks[0].ddp_config.overlap_grad_reduce
    for chunk in chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.grad_sync_func = ([c.start_grad_sync for c in chunks] if len(chunks) > 1 else
                                 chunks[0].start_grad_sync) if overlap_grad_reduce else None
        config.grad_scale_func = optimizer.scale_loss if fp16 else None


def _gather_params(chunks: list) -> None:
    """With ``--overlap-param-gather`` the optimizer step leaves other ranks' updated shards to the next forward's
    all-gather; checkpoints and exports read whole parameters, so gather them now (a no-op otherwise)."""
    for chunk in chunks:
        if chunk.use_forward_hook:
            chunk.start_param_sync(force_sync=True)


def _reduce_loss(loss_dicts: list[dict]) -> float:
    """Mean loss over microbatches and data-parallel ranks, available on every rank (only last-stage TP rank 0
    ranks contribute)."""
    contributes = bool(loss_dicts) and ps.get_tensor_model_parallel_rank() == 0
    local = sum(float(d["lm loss"][0]) for d in loss_dicts) / max(len(loss_dicts), 1)
    t = torch.tensor([local if contributes else 0.0, 1.0 if contributes else 0.0], dtype=torch.float64,
                     device=torch.cuda.current_device())  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return float(t[0] / t[1])


def _count_tokens(microbatches: list[dict]) -> dict:
    """Non-pad tokens, image tokens, all positions and samples of a step (this rank's counts x the DP size)."""
    dp = ps.get_data_parallel_world_size()
    count = {"tokens": lambda b: (b["modality"] != MODALITY_PAD).sum(),
             "image_tokens": lambda b: (b["modality"] == MODALITY_IMAGE).sum(),
             "positions": lambda b: b["modality"].numel(),
             "samples": lambda b: (b["sample_id"].max(dim=1).values + 1).sum()}  # sample_id 0.. per row
    return {key: sum(int(f(b)) for b in microbatches) * dp for key, f in count.items()}


def evaluate(chunks: list, loader, run: TrainingConfig, num_microbatches: int,
             forward_step=visualchat_forward_step) -> float:
    for c in chunks:
        c.eval()
    losses = []
    with torch.no_grad():
        batches = loader.forever()
        for _ in range(run.metrics.eval_iters):
            mbs = [next(batches) for _ in range(num_microbatches)]
            out = run_schedule(chunks, mbs, num_microbatches=num_microbatches, seq_length=run.batch.seq_length,
                               micro_batch_size=run.batch.micro_batch_size, forward_step=forward_step,
                               forward_only=True)
            losses.append(_reduce_loss(out))
    for c in chunks:
        c.train()
    return sum(losses) / len(losses)


def _report_lora(chunks: list, cfg: VisualChatConfig) -> None:
    """Rank 0 logs the adapter parameter counts, summed over one model replica (the ranks of data-parallel rank 0)."""
    replica = ps.get_data_parallel_rank(with_context_parallel=True) == 0  # CP ranks hold copies too
    counts = [count_lora_parameters(c) for c in unwrap_model(chunks)] if replica else []
    total = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.int64,
                         device=torch.cuda.current_device())
    dist.all_reduce(total)
    if dist.get_rank() == 0:
        print(lora_report(cfg, int(total[0]), int(total[1])), flush=True)


def config_record(cfg: VisualChatConfig, run: TrainingConfig) -> dict:
    """What a checkpoint's ``meta.json`` records: the model and layout it must agree on to be resumed (everything
    but the data-parallel size), and the whole run config."""
    model = dataclasses.asdict(cfg)
    model.pop("parallel")
    if not cfg.lora.enabled:  # records of runs without adapters stay as before LoRA existed (their resumes too)
        model.pop("lora")
    if cfg.fusion.kind != JAM_CROSS:  # likewise for runs of the one-decoder model
        model.pop("fusion")
    return {"model": model, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp,
            "pp_layers": list(cfg.parallel.pp_layers) if cfg.parallel.pp_layers else None, "dp": cfg.parallel.dp,
            "run": run.to_dict()}


def train(run: TrainingConfig) -> dict:
    """Run training; returns {"losses": [...per step], "eval_losses"/"eval_accuracy": [...per eval], "iteration": n,
    ...} (same values on all ranks)."""
    batch, ckpt = run.batch, run.checkpoint

    # 1. tokenizer, config and data (the tokenizer's added tokens may enlarge the vocabulary)
    tokenizer = load_tokenizer(run)
    cfg = model_config(run, dist.get_world_size(), vocab_size=tokenizer.vocab_size)
    dp = cfg.parallel.dp
    num_microbatches = batch.global_batch_size // (batch.micro_batch_size * dp)
    train_loader, eval_loader = build_loaders(run, cfg, tokenizer)  # before the model: bad data fails fast

    # 2. model, DDP, optimizer, schedule
    vocab = tokenizer.image_vocab
    chunks = wrap_model(build_model_chunks(cfg, run, tokenizer.new_token_ids, vocab.token_ids if vocab else ()),
                        use_distributed_optimizer=run.parallelism.use_distributed_optimizer,
                        fp16=run.precision.fp16, bf16=run.precision.bf16,
                        overlap_grad_reduce=run.parallelism.overlap_grad_reduce,
                        overlap_param_gather=run.parallelism.overlap_param_gather)
    optimizer = build_optimizer(chunks, run)
    _configure_schedule_hooks(chunks, optimizer, run.precision.fp16)
    if cfg.lora.enabled:
        _report_lora(chunks, cfg)
    train_iters = batch.train_iters or math.ceil(batch.train_epochs * len(train_loader.dataset) /
                                                 batch.global_batch_size)
    record = {**config_record(cfg, run), "train_iters": train_iters}  # a save at train_iters: the run is complete
    scheduler = build_scheduler(optimizer, run, train_iters)

    # 3. resume (and refuse an --export-dir that cannot be written now, not after training)
    if ckpt.export_dir:
        check_export_dir(ckpt.export_dir)
    if ckpt.export_adapters:
        check_adapters_dir(ckpt.export_adapters)
    resume = training_state.find_resume_point(ckpt.load, ckpt.save, ckpt.load_iteration)
    start = {"iteration": 0, "consumed_samples": 0}
    if resume is not None:
        start = training_state.load_checkpoint(resume.root, chunks, optimizer, scheduler,
                                               distributed_optimizer=run.parallelism.use_distributed_optimizer,
                                               config_record=record, iteration=resume.iteration)
        train_loader.seek(start["consumed_samples"])
    if dist.get_rank() == 0:
        print(training_state.resume_message(resume, start.get("layout_change")), flush=True)
        if ckpt.save:
            tokenizer.save(os.path.join(ckpt.save, "tokenizer"))
    keep_last = training_state.KeepLast.for_run(ckpt.keep_last, ckpt.save, resume)

    # 4. loop
    logger = MetricsLogger(enabled=dist.get_rank() == 0, total_iters=train_iters,
                           tensorboard_dir=run.metrics.tensorboard_dir, progress_bar=not run.metrics.no_progress_bar,
                           start_iter=start["iteration"], packing=run.data.pack)
    schedule = dict(num_microbatches=num_microbatches, seq_length=batch.seq_length,
                    micro_batch_size=batch.micro_batch_size)
    forward_step = visualchat_forward_step if vocab is None else modality_weighted_forward_step(
        vocab, run.data.text_loss_weight, run.data.image_code_loss_weight)
    batches = train_loader.forever()
    losses, eval_losses, eval_accuracy = [], [], []
    iteration = start["iteration"]
    while iteration < train_iters:
        microbatches = [next(batches) for _ in range(num_microbatches)]
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        loss_dicts = run_schedule(chunks, microbatches, forward_step=forward_step, **schedule)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=batch.global_batch_size)
        iteration += 1
        loss = _reduce_loss(loss_dicts)
        losses.append(loss)
        logger.step(iteration, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                    **_count_tokens(microbatches), skipped=Counter(train_loader.skipped),
                    log=iteration % run.metrics.log_interval == 0)
        if eval_loader is not None and (iteration % run.metrics.eval_interval == 0 or iteration == train_iters):
            eval_losses.append(evaluate(chunks, eval_loader, run, num_microbatches, forward_step))
            eval_accuracy.append(answer_accuracy(chunks, eval_loader, max_batches=run.metrics.eval_accuracy_iters,
                                                 **schedule))
            logger.eval(iteration, eval_losses[-1], eval_accuracy[-1])
        exiting = bool(ckpt.exit_interval) and iteration % ckpt.exit_interval == 0
        if ckpt.save and (exiting or iteration == train_iters or
                          (ckpt.save_interval and iteration % ckpt.save_interval == 0)):
            _gather_params(chunks)
            training_state.save_checkpoint(ckpt.save, iteration, chunks, optimizer, scheduler,
                                           consumed_samples=train_loader.consumed_samples,
                                           distributed_optimizer=run.parallelism.use_distributed_optimizer,
                                           config_record=record, keep_last=keep_last)
        if exiting:
            break
    logger.close()

    # 5. export
    _gather_params(chunks)
    if ckpt.export_dir:
        drawn_with = run.data.image_tokenizer  # the chat checkpoint keeps it, so chat can draw the codes
        save_chat_checkpoint(chunks, tokenizer, ckpt.export_dir, state_dict=merge_lora,
                             image_tokenizer=None if drawn_with is None else parse_image_tokenizer_spec(drawn_with))
    if ckpt.export_adapters:
        save_adapters(chunks, ckpt.export_adapters)
    return {"losses": losses, "eval_losses": eval_losses, "eval_accuracy": eval_accuracy, "iteration": iteration,
            "skipped": dict(train_loader.skipped), "dp": dp, "pp_rank": ps.get_pipeline_model_parallel_rank()}


def main(argv: Optional[list[str]] = None) -> int:
    run = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if run.dry_run:
        return dry_run(run, world)
    initialize_parallel(parallel_config(run, world), run.batch.seed)
    try:
        train(run)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
