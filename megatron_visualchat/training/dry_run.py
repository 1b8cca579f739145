"""``pretrain_vchat.py --dry-run``: everything a launch can get wrong before the first step, checked on one CPU
process in seconds, so a typo does not wait hours in a queue (and the example scripts are tested without GPUs).

It parses the real flags, checks every path flag, loads the tokenizer, plans the data blend exactly as training
does, and builds the model at the real layout on the meta device (shapes only, no memory, no weights read). One
process plays every rank: torch's fake process group (collectives are no-ops) lets megatron-core's
``parallel_state`` come up as any rank of the real world size. Data-parallel replicas are identical, so the model
is built once per (TP, PP) position and reported for every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from torch.overrides import TorchFunctionMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_visualchat.checkpoint import training_state
from megatron_visualchat.checkpoint.chat import check_export_dir
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse_cross import TOWER_DIRS, JamCrossRecord
from megatron_visualchat.checkpoint.init_from import init_iteration
from megatron_visualchat.checkpoint.layout import read_tracker
from megatron_visualchat.checkpoint.legacy_format import ConversionRecord, rank_file
from megatron_visualchat.config import JAM_CROSS, ConfigError, ParallelConfig, TrainableConfig, VisualChatConfig
from megatron_visualchat.model.jam_cross import JamCrossModel, apply_jam_cross_trainable
from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy
from megatron_visualchat.argtypes import TRAINABLE_PARTS
from megatron_visualchat.training.arguments import model_config
from megatron_visualchat.training.data_setup import build_loaders, dataset_specs, image_tokenizer, load_tokenizer
from megatron_visualchat.training.run_config import TrainingConfig

# megatron-core's default rank order (initialize_parallel does not change it): TP fastest, then DP, then PP.
RANK_ORDER = "tp-cp-ep-dp-pp"


def dry_run(run: TrainingConfig, world_size: int) -> int:
    """Check ``run`` on ``world_size`` ranks and print what it would train; a problem raises ``ConfigError``."""
    par = model_config(run, world_size).parallel  # the layout first: it needs no file
    print(f"dry run: {world_size} ranks = TP {par.tp} x PP {par.pp}" + (f" x CP {par.cp}" if par.cp > 1 else "")
          + f" x DP {par.dp}"
          + (f", pipeline layers {','.join(map(str, par.pp_layers))}" if par.pp_layers else "")
          + (f", virtual pipeline {par.vpp}" if par.vpp else "")
          + (", sequence parallel" if par.sequence_parallel else ""))
    with _as_rank(0, world_size, par):
        check_paths(run)
        try:
            tokenizer = load_tokenizer(run)
        except ConfigError:
            raise
        except (OSError, ValueError) as e:  # a directory without a saved tokenizer, or a damaged one
            raise ConfigError(f"--tokenizer-dir {run.data.tokenizer_dir}: {e}") from None
        cfg = model_config(run, world_size, vocab_size=tokenizer.vocab_size)
        if run.model.llm_load:
            _check_llm_checkpoint(run.model.llm_load, cfg)
        print(f"tokenizer: {tokenizer.vocab_size} tokens; vocabulary {cfg.llm.vocab_size} padded to "
              f"{cfg.llm.padded_vocab_size(par.tp)} rows")
        if run.data.image_tokenizer:
            image_tok = image_tokenizer(run)
            print(f"image tokenizer {run.data.image_tokenizer}: {image_tok.codebook_size} codes, "
                  f"{image_tok.num_codes} per {image_tok.image_size} px image")
        _report_data(run, cfg, tokenizer)
    vocab = tokenizer.image_vocab
    _report_model(run, cfg, world_size, tokenizer.new_token_ids, vocab.token_ids if vocab else ())
    print("dry run ok")
    return 0


@contextlib.contextmanager
def _as_rank(rank: int, world_size: int, par: ParallelConfig):
    """This process as global ``rank`` of a fake world: megatron-core's groups are those of the real job."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(par.tp, par.pp, par.vpp, context_parallel_size=par.cp, order=RANK_ORDER,
                                     create_gloo_process_groups=False)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def check_paths(run: TrainingConfig) -> None:
    """Every input path the flags name must exist (one error lists each missing one with its flag); resume and
    export directories get training's own up-front checks."""
    m, d = run.model, run.data
    wanted = [("--llm-load", m.llm_load, os.path.isdir), ("--tokenizer-dir", d.tokenizer_dir, os.path.isdir),
              ("--vision-weights", m.vision_weights, os.path.exists),
              ("--projector-weights", m.projector_weights, os.path.isfile)]
    for flag, which in (("--data", "train"), ("--eval-data", "eval")):
        wanted += [(flag, spec["path"], os.path.isfile) for spec in dataset_specs(run, which)]
    missing = [f"{flag} {path}: no such {'directory' if exists is os.path.isdir else 'file'}"
               for flag, path, exists in wanted if path and not exists(path)]
    if missing:
        raise ConfigError("missing input path(s):\n  " + "\n  ".join(missing))
    ckpt = run.checkpoint
    try:
        for root in ckpt.init_from:
            print(f"--init-from {root}: iteration {init_iteration(root)}")
        if ckpt.export_dir:
            check_export_dir(ckpt.export_dir)
        print(training_state.resume_message(
            training_state.find_resume_point(ckpt.load, ckpt.save, ckpt.load_iteration)))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def _check_llm_checkpoint(path: str, cfg: VisualChatConfig) -> None:
    """``--llm-load`` must be a complete hf-to-megatron conversion of the preset's architecture (its vocabulary
    may be smaller than the tokenizer's); a different layout is only resharded on load, which is slower."""
    if JamCrossRecord.find(path) is not None:  # a cross fusion: each tower is such a conversion
        for tower in TOWER_DIRS:
            _check_llm_checkpoint(os.path.join(path, tower), cfg)
        return
    try:
        record = ConversionRecord.load(path)
        iteration = read_tracker(path)
    except CheckpointError as e:
        raise ConfigError(f"--llm-load {path}: {e}") from None
    saved_arch = dataclasses.replace(record.llm, vocab_size=cfg.llm.vocab_size)
    if saved_arch != cfg.llm:
        raise ConfigError(f"--llm-load {path} holds {record.llm}, but --model-preset gives {cfg.llm}")
    saved = record.parallel
    absent = [str(f) for t in range(saved.tp) for s in range(saved.pp)
              if not (f := rank_file(path, iteration, t, s, saved.pp)).is_file()]
    if absent:
        raise ConfigError(f"--llm-load {path}: {len(absent)} rank file(s) missing, e.g. {absent[0]}")
    layout = f"TP={saved.tp}, PP={saved.pp}" + (f", layers {list(saved.pp_layers)}" if saved.pp_layers else "")
    print(f"--llm-load: {record.dtype} conversion at {layout}")
    par = cfg.parallel
    if (saved.tp, saved.pp, saved.pp_layers) != (par.tp, par.pp, par.pp_layers) or par.vpp:
        print(f"note: --llm-load was converted at {layout}, not at this layout: every rank reshards on load "
              f"(slower); reconvert with hf-to-megatron --tp {par.tp} --pp {par.pp}"
              + (f" --pp-layers {','.join(map(str, par.pp_layers))}" if par.pp_layers else ""))


def _report_data(run: TrainingConfig, cfg: VisualChatConfig, tokenizer) -> None:
    """Build this run's datasets and loaders as training does; print each source's share and encode one sample."""
    try:
        train, evaluation = build_loaders(run, cfg, tokenizer)
        sample = train.dataset[0]
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    batch = run.batch
    iters = batch.train_iters or math.ceil(batch.train_epochs * len(train.dataset) / batch.global_batch_size)
    _print_blend("train", train.dataset)
    unit = f"bins of {batch.seq_length} positions (--pack)" if run.data.pack else "samples"
    print(f"  {iters} iterations of {batch.global_batch_size} {unit}; the first sample encodes to "
          f"{len(sample['input_ids'])} tokens and {len(sample['images'])} image(s)")
    if evaluation is not None:
        _print_blend("eval", evaluation.dataset)


def _print_blend(name: str, dataset) -> None:
    plan, records = dataset.plan, np.diff(dataset.plan.offsets)
    print(f"data ({name}): {len(plan)} samples")
    print(f"  {'samples':>9} {'records':>9} {'of':>9}  source")
    for i, source in enumerate(dataset.sources):
        mine = plan.source_ids == i
        print(f"  {int(mine.sum()):>9} {int(records[mine].sum()):>9} {len(source):>9}  "
              f"{type(source).__name__} {source.path}")


@dataclasses.dataclass(frozen=True)
class RankReport:
    rank: int
    dp: int
    pp: int
    tp: int
    layers: str  # global decoder layers (1-based) this rank holds
    parameters: int
    trainable: int
    unique: int  # parameters no other rank of the replica also holds (TP-replicated ones on TP rank 0 only)
    unique_trainable: int


def rank_positions(par: ParallelConfig) -> dict[int, tuple[int, int, int]]:
    """Global rank -> (dp, pp, tp) rank, by megatron-core's own rank generator. With context parallelism "dp"
    is the index in the data-and-context-parallel group (CP ranks hold the same parameters, like DP ranks)."""
    gen = ps.RankGenerator(tp=par.tp, ep=1, dp=par.dp, pp=par.pp, cp=par.cp, order=RANK_ORDER)
    where = {r: [0, 0, 0] for r in range(par.world_size)}
    for axis, token in enumerate(("dp-cp", "pp", "tp")):
        for group in gen.get_ranks(token):
            for index, r in enumerate(group):
                where[r][axis] = index
    return {r: tuple(v) for r, v in where.items()}


def build_meta_chunks(run: TrainingConfig, cfg: VisualChatConfig) -> list:
    """This rank's model chunk(s) as training builds them, on the meta device and without loading weights (CPU
    initialisation: megatron's GPU path would allocate on the device, and only its initialisers mark TP-split
    parameters)."""
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, encoder_weights=None))
    overrides = {**run.recompute.transformer_overrides(), "use_cpu_initialization": True}
    stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
    with torch.device("meta"), _SkipRandomFillsOnMeta():
        model = JamCrossModel if cfg.fusion.kind == JAM_CROSS else VisualChatModel
        return [model(cfg, vp_stage=s, transformer_overrides=overrides) for s in stages]


def _apply_policy(chunk, trainable: TrainableConfig, new_token_rows, new_output_rows) -> list[str]:
    if isinstance(chunk, JamCrossModel):
        return apply_jam_cross_trainable(chunk, trainable)
    return apply_trainable_policy(chunk, trainable, new_token_rows, new_output_rows)


class _SkipRandomFillsOnMeta(TorchFunctionMode):
    """Initialisers' in-place fills leave a meta tensor as it is, but torch runs their meta kernels as Python
    references (milliseconds a call: most of a 70B build's half minute); skip them."""

    FILLS = {torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.uniform_, torch.Tensor.normal_,
             torch.Tensor.uniform_, torch.Tensor.erfinv_, torch.Tensor.clamp_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS:
            tensor = args[0] if args else kwargs["tensor"]  # torch.nn.init passes it by keyword
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _count(chunks: list) -> tuple[int, int, int, int]:
    params = [p for c in chunks for p in c.parameters()]
    unique = [p for p in params if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad))


def _selected_parts(chunks: list, trainable: TrainableConfig, new_token_rows: tuple[int, ...],
                    new_output_rows: tuple[int, ...]) -> set[str]:
    """The enabled trainable parts that select at least one parameter here (the policy applied part by part)."""
    selected = set()
    for part in sorted(TRAINABLE_PARTS):
        if getattr(trainable, part):
            alone = TrainableConfig(**{name: name == part for name in TRAINABLE_PARTS})
            if any(_apply_policy(c, alone, new_token_rows, new_output_rows) for c in chunks):
                selected.add(part)
    return selected


def _layers(chunks: list) -> str:
    spans = []
    for c in chunks:
        numbers = [layer.layer_number for layer in (c.tower_a if isinstance(c, JamCrossModel) else
                                                    c.language_model).decoder.layers]
        spans.append(f"{numbers[0]}-{numbers[-1]}" if numbers else "-")
    return ",".join(spans)


def rank_reports(run: TrainingConfig, cfg: VisualChatConfig, world_size: int, new_token_rows: tuple[int, ...] = (),
                 new_output_rows: tuple[int, ...] = ()) -> tuple[list[RankReport], set[str]]:
    """Per-rank parameter counts (one meta build per (TP, PP) position) and the trainable parts that selected
    some parameter on some rank."""
    par = cfg.parallel
    positions = rank_positions(par)
    built: dict[tuple[int, int], tuple] = {}
    selected: set[str] = set()
    for rank, (dp, pp, tp) in sorted(positions.items()):
        if dp:
            continue
        with _as_rank(rank, world_size, par):
            if (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()) != (pp, tp):
                raise RuntimeError(f"rank {rank}: megatron-core placed it at a position other than PP {pp}, TP {tp}")
            chunks = build_meta_chunks(run, cfg)
            selected |= _selected_parts(chunks, cfg.trainable, new_token_rows, new_output_rows)
            for c in chunks:
                _apply_policy(c, cfg.trainable, new_token_rows, new_output_rows)
            built[pp, tp] = (_layers(chunks), *_count(chunks))
    reports = [RankReport(rank, dp, pp, tp, *built[pp, tp]) for rank, (dp, pp, tp) in sorted(positions.items())]
    return reports, selected


def _report_model(run: TrainingConfig, cfg: VisualChatConfig, world_size: int,
                  new_token_rows: tuple[int, ...], new_output_rows: tuple[int, ...]) -> None:
    m = run.model
    reports, selected = rank_reports(run, cfg, world_size, new_token_rows, new_output_rows)
    if cfg.fusion.kind == JAM_CROSS:
        print(f"model: jam-cross, two towers of {cfg.llm.num_layers} layers, a cross link after every "
              f"{cfg.fusion.cross_interval}; parameters per rank:")
    else:
        print(f"model: {m.model_preset} + {m.vision_encoder} encoder + {m.projector} projector, attention "
              f"{m.attention_mode}, modality split {m.modality_split}; parameters per rank:")
    dp = "dp" if cfg.parallel.cp == 1 else "dpcp"  # CP ranks hold the same parameters, like DP ranks
    print(f"  {'rank':>5} {dp:>4} {'pp':>3} {'tp':>3} {'layers':>9} {'parameters':>15} {'trainable':>15}")
    for r in reports:
        print(f"  {r.rank:>5} {r.dp:>4} {r.pp:>3} {r.tp:>3} {r.layers:>9} {r.parameters:>15,} {r.trainable:>15,}")
    replica = [r for r in reports if r.dp == 0]
    print(f"model total: {sum(r.unique for r in replica):,} parameters, {sum(r.unique_trainable for r in replica):,} "
          f"trainable (the sum over one replica's ranks, TP-replicated parameters counted once)")
    for part in sorted(TRAINABLE_PARTS):
        if getattr(cfg.trainable, part) and part not in selected:
            print(f"note: --trainable {part} selects no parameter of this model")

