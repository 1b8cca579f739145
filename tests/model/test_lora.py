"""LoRA on one process and through training: options and flags are checked; step 0 equals the base model; merged
weights give the logits of the unmerged adapters (every modality split, every encoder family); only adapters and the
chosen parts get gradients; a 7B-shaped build counts the closed-form adapter parameters; training resumes exactly,
refuses another rank or targets, and exports merged weights and unmerged adapters that chat loads to the same
logits."""

import contextlib
import io
import json

import pytest
import torch

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import (
    LLM_PRESETS, AttentionConfig, ConfigError, LoraConfig, TrainableConfig, VisionConfig, VisualChatConfig,
)
from megatron_visualchat.testing.batches import visualchat_batch
from megatron_visualchat.testing.distributed import RankFailed, run_parallel

LLM = LLM_PRESETS["tiny"]
ROWS = [["tt", 0, "ttt", 1, "tt"], ["tttt", 0, "ttttt"]]


# --- options and flags ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora,match", [
    (LoraConfig(rank=-1), "lora.rank=-1 must be >= 0"),
    (LoraConfig(rank=4, targets=("qkv", "gate")), "lora.targets entry='gate' is not one of"),
    (LoraConfig(rank=4, targets=()), "needs lora.targets"),
    (LoraConfig(vision_rank=2, vision_targets=("fc1", "fc1")), "lora.vision_targets=.*twice"),
    (LoraConfig(rank=4, alpha=0.0), "lora.alpha=0.0 must be > 0"),
    (LoraConfig(rank=4, dropout=1.0), "lora.dropout=1.0"),
])
def test_config_refuses_bad_options(lora, match):
    with pytest.raises(ConfigError, match=match):
        VisualChatConfig(lora=lora).validate()


def test_config_refuses_transformer_engine_and_accepts_rank_zero():
    with pytest.raises(ConfigError, match="needs attention.backend='local'"):
        VisualChatConfig(attention=AttentionConfig(backend="te"), lora=LoraConfig(rank=8)).validate()
    VisualChatConfig(attention=AttentionConfig(backend="te"), lora=LoraConfig(alpha=0.0, targets=())).validate()


def test_flags_become_the_lora_section():
    from megatron_visualchat.training.arguments import model_config, parse_args

    base = ["--synthetic", "8", "--train-iters", "1", "--seq-length", "64"]
    run = parse_args(base + ["--lora-rank", "8", "--lora-alpha", "32", "--lora-dropout", "0.05", "--lora-targets",
                             "qkv,fc2", "--vision-lora-rank", "4", "--vision-lora-targets", "qkv"])
    assert model_config(run, 1).lora == LoraConfig(rank=8, alpha=32.0, dropout=0.05, targets=("qkv", "fc2"),
                                                   vision_rank=4, vision_targets=("qkv",))
    with pytest.raises(ConfigError, match="lora.targets entry='o_proj'"):
        model_config(parse_args(base + ["--lora-rank", "8", "--lora-targets", "qkv,o_proj"]), 1)
    with pytest.raises(ConfigError, match="--export-adapters writes LoRA adapters"):
        model_config(parse_args(base + ["--export-adapters", "out"]), 1)


# --- one process: step 0, merge, gradients ------------------------------------------------------------------------

def _cfg(split="qkvo", encoder="tiny", rank=4, vision_rank=2, trainable=TrainableConfig()):
    return VisualChatConfig(llm=LLM, attention=AttentionConfig(modality_split=split),
                            vision=VisionConfig(encoder=encoder), trainable=trainable,
                            lora=LoraConfig(rank=rank, alpha=8.0, vision_rank=vision_rank))


def _batch(encoder):
    from megatron_visualchat.model.vision import get_encoder_spec

    spec = get_encoder_spec(encoder)
    return visualchat_batch(ROWS, spec.num_image_tokens, LLM.vocab_size, image_size=spec.image_size)


def _forward(model, batch, labels=False):
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"] if labels else None, pixel_values=batch["pixel_values"],
                 num_images=batch["num_images"])


def _randomize_b(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0.0, std)


def _step0_and_merge(cases):
    """Per (split, encoder): |LoRA - base| at step 0 (loss, logits); with random B, |merged - unmerged| and
    |unmerged - base| of the logits."""
    from megatron_visualchat.model.lora import merge_lora
    from megatron_visualchat.model.visualchat import VisualChatModel

    out = {}
    for split, encoder in cases:
        cfg = _cfg(split, encoder)
        torch.manual_seed(0)
        base = VisualChatModel(cfg.replace(lora=LoraConfig())).eval()
        lora = VisualChatModel(cfg).eval()
        missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and missing and all("lora_" in k for k in missing)
        batch = _batch(encoder)
        with torch.no_grad():
            step0 = (float((_forward(lora, batch, True) - _forward(base, batch, True)).abs().max()),
                     float((_forward(lora, batch) - _forward(base, batch)).abs().max()))
            base_logits = _forward(base, batch)
            _randomize_b(lora)
            unmerged = _forward(lora, batch)
            base.load_state_dict(merge_lora(lora))  # strict: exactly the keys of the model without LoRA
            merged = _forward(base, batch)
        out[split, encoder] = (*step0, float((merged - unmerged).abs().max()),
                               float((unmerged - base_logits).abs().max()))
    return out


CASES = [("none", "tiny"), ("kv", "tiny"), ("qkv", "tiny"), ("qkvo", "tiny"), ("qkvo", "tiny-eva"),
         ("none", "tiny-qwen")]  # timm ViT blocks (CLIP; SigLIP's are the same), EVA's fused-bias qkv, QWen's trunk


@pytest.fixture(scope="module")
def step0_and_merge():
    return run_parallel(_step0_and_merge, args=(CASES,))[0]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_step0_equals_base_and_merged_equals_unmerged(step0_and_merge, case):
    loss_diff, logit_diff, merge_diff, adapter_effect = step0_and_merge[case]
    assert loss_diff == 0 and logit_diff == 0  # B = 0: the adapters add exact zeros
    assert adapter_effect > 1e-2  # the random B changes the logits, so the merge comparison means something
    assert merge_diff < 2e-5  # measured ~6e-7: W + s B A folded in fp32 vs. the low-rank path


def _gradients(trainable, random_b):
    from megatron_visualchat.model.visualchat import VisualChatModel, apply_trainable_policy

    torch.manual_seed(0)
    model = VisualChatModel(_cfg(trainable=trainable))
    names = apply_trainable_policy(model, trainable)
    if random_b:
        _randomize_b(model)
    batch = _batch("tiny")
    (_forward(model, batch, labels=True) * batch["loss_mask"]).sum().backward()
    return names, {n: (None if p.grad is None else bool(p.grad.any())) for n, p in model.named_parameters()}


def test_only_adapters_and_chosen_parts_get_gradients():
    no_image_side = TrainableConfig(projector=True, image_projections=False)
    (names, grads), (_, fresh) = (run_parallel(_gradients, args=(no_image_side, b))[0] for b in (True, False))
    adapters = [n for n in grads if "lora_" in n]
    assert sorted(names) == sorted(adapters + [n for n in grads if n.startswith("vision.projector.")])
    assert all(grads[n] is None for n in grads if n not in names)  # frozen: text weights, image weights, encoder
    last_image_o = f"language_model.decoder.layers.{LLM.num_layers - 1}.self_attention.linear_proj.image_lora_"
    assert sorted(n for n in names if not grads[n]) == [last_image_o + "a", last_image_o + "b"]  # no loss there
    # at step 0 (B = 0) only B moves: A's gradient passes through B
    assert {n for n in adapters if fresh[n]} == {n for n in adapters if n.endswith("lora_b")} - {last_image_o + "b"}
    names, grads = run_parallel(_gradients, args=(TrainableConfig(projector=False, llm=True), True))[0]
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.weight" in names
    assert not any(n.startswith("vision.projector.") for n in names)


def _vision_wrapping():
    from torch import nn

    from megatron_visualchat.model.lora import LoraLinear, add_vision_lora

    def encoder():
        block = nn.Module()
        block.qkv, block.fc1 = nn.Linear(4, 12), nn.Linear(4, 8)
        model = nn.Module()
        model.blocks, model.qkv = nn.Sequential(block), nn.Linear(4, 4)  # a qkv outside the blocks stays as it is
        return model

    model = encoder()
    wrapped = add_vision_lora(model, LoraConfig(vision_rank=2, vision_targets=("qkv", "fc1")))
    assert isinstance(model.blocks[0].qkv, LoraLinear) and type(model.qkv) is nn.Linear
    try:
        add_vision_lora(encoder(), LoraConfig(vision_rank=2, vision_targets=("fc1", "fc2")))
    except ConfigError as e:
        return wrapped, str(e)


def test_vision_adapters_go_on_block_linears_only_and_refuse_missing_targets():
    wrapped, refusal = run_parallel(_vision_wrapping)[0]
    assert wrapped == 2
    assert refusal.startswith("lora.vision_targets ['fc2']: the vision encoder's blocks have no such linear")


# --- parameter counts at 7B -------------------------------------------------------------------------------------

VIT_L = dict(depth=24, width=1024, mlp=4096)  # clip-vit-l-14-336 blocks


def _meta_counts(preset, rank, vision_rank):
    """This rank's (decoder, vision) adapter counts of a meta-device build, and the train-start log line."""
    from megatron_visualchat.model.lora import count_lora_parameters
    from megatron_visualchat.model.visualchat import VisualChatModel
    from megatron_visualchat.testing.equivalence import current_parallel
    from megatron_visualchat.training.pretrain import _report_lora

    cfg = VisualChatConfig.from_preset(preset, vision=VisionConfig(encoder="clip-vit-l-14-336"),
                                       parallel=current_parallel(),
                                       lora=LoraConfig(rank=rank, alpha=2.0 * rank, vision_rank=vision_rank))
    with torch.device("meta"):
        model = VisualChatModel(cfg, transformer_overrides={"use_cpu_initialization": True})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        _report_lora([model], cfg)
    return (*count_lora_parameters(model), log.getvalue())


def test_7b_adapter_count_matches_the_closed_form():
    h, f = 4096, 11008
    closed = 32 * 16 * ((h + 3 * h) + (h + h) + (h + 2 * f) + (f + h))  # qkv, proj, fc1 (gate; up), fc2
    assert closed == 33_685_504
    per_rank = run_parallel(_meta_counts, tp=2, args=("llama2-7b", 16, 16))
    assert sum(d for d, _, _ in per_rank) == closed
    v = VIT_L
    vision = v["depth"] * 16 * ((v["width"] + 3 * v["width"]) + 2 * v["width"] + 2 * (v["width"] + v["mlp"]))
    assert sum(x for _, x, _ in per_rank) == vision == per_rank[0][1]  # replicated: counted on TP rank 0
    assert per_rank[0][2] == (f"LoRA adapters: {closed + vision:,} trainable parameters (alpha 32); decoder: "
                              f"{closed:,} (closed form {closed:,}), rank 16 on qkv,proj,fc1,fc2; vision encoder: "
                              f"{vision:,}, rank 16 on qkv,proj,fc1,fc2\n")


def _closed_form(preset, rank):
    from megatron_visualchat.model.lora import decoder_lora_parameters

    return decoder_lora_parameters(VisualChatConfig.from_preset(preset, lora=LoraConfig(rank=rank)))


def test_gqa_closed_form_at_70b():
    h, f, kv = 8192, 28672, 2 * 8 * 128
    closed = run_parallel(_closed_form, args=("llama2-70b", 16))[0]
    assert closed == 80 * 16 * ((h + h + kv) + 2 * h + (h + 2 * f) + (f + h))
    decoder, _, _ = run_parallel(_meta_counts, args=("llama2-70b", 16, 0))[0]
    assert decoder == closed


# --- training: resume, refusals, exports ------------------------------------------------------------------------

def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))


def _argv(cache, *extra):
    return ["--synthetic", "64", "--data-cache-dir", str(cache), "--micro-batch-size", "2", "--global-batch-size", "8",
            "--seq-length", "160", "--train-iters", "4", "--modality-split", "qkvo", "--lr", "3e-3",
            "--no-progress-bar", "--log-interval", "100", "--lora-rank", "4", "--vision-lora-rank", "2",
            "--trainable", "projector,image_projections,embeddings", *extra]  # vocabulary rows in the adapter file


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 4-step LoRA run at TP=2 that exports both ways; the same run stopped after 2 steps; and the base
    (the same run at lr 0, so B stays 0 and its merged export holds the frozen weights)."""
    root = tmp_path_factory.mktemp("lora_runs")
    cache = root / "data"
    tp2 = ["--tensor-model-parallel-size", "2"]
    straight = run_parallel(_train, tp=2, args=(_argv(cache, *tp2, "--export-dir", str(root / "merged"),
                                                      "--export-adapters", str(root / "adapters")),))[0]
    first = run_parallel(_train, tp=2, args=(_argv(cache, *tp2, "--save", str(root / "save"), "--exit-interval",
                                                   "2"),))[0]
    run_parallel(_train, tp=2, args=(_argv(cache, *tp2, "--lr", "0", "--train-iters", "1", "--export-dir",
                                           str(root / "base")),))
    return dict(root=root, cache=cache, straight=straight, first=first)


def test_resume_reproduces_the_straight_run(runs):
    root, tp2 = runs["root"], ["--tensor-model-parallel-size", "2"]
    second = run_parallel(_train, tp=2, args=(_argv(runs["cache"], *tp2, "--save", str(root / "save")),))[0]
    assert second["iteration"] == 4
    assert runs["first"]["losses"] + second["losses"] == runs["straight"]["losses"]
    saved = json.loads((root / "save" / "iter_0000002" / "meta.json").read_text())
    assert saved["model"]["lora"]["rank"] == 4


@pytest.mark.parametrize("change,field", [(["--lora-rank", "8"], 'model.lora.rank: saved 4, this run 8'),
                                          (["--lora-targets", "qkv,proj"],
                                           'model.lora.targets: saved ["qkv", "proj", "fc1", "fc2"], this run '
                                           '["qkv", "proj"]')])
def test_resume_with_other_adapters_is_refused(runs, change, field):
    args = _argv(runs["cache"], "--tensor-model-parallel-size", "2", "--save", str(runs["root"] / "save"), *change)
    with pytest.raises(RankFailed, match="was saved with another model or layout") as e:
        run_parallel(_train, tp=2, args=(args,))
    assert field in str(e.value)


def _chat_logits(load, adapters=None):
    from megatron_visualchat.inference.checkpoint import build_chat_model

    model, tokenizer, cfg = build_chat_model(load, adapters=adapters)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # chat needs no LoRA code
    batch = visualchat_batch(ROWS, 17, cfg.llm.vocab_size)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                       pixel_values=batch["pixel_values"], num_images=batch["num_images"], runtime_gather_output=True)
    return logits[..., :cfg.llm.vocab_size]  # the padding depends on the TP size


def test_exports_merged_and_adapters_chat_alike(runs):
    root = runs["root"]
    merged = run_parallel(_chat_logits, args=(root / "merged",))[0]
    base = run_parallel(_chat_logits, args=(root / "base",))[0]
    for tp in (1, 2):
        applied = run_parallel(_chat_logits, tp=tp, args=(root / "base", root / "adapters"))[0]
        torch.testing.assert_close(applied, merged, rtol=0, atol=1e-6)  # measured: 0 at TP=1, 1.8e-7 at TP=2
    assert (merged - base).abs().max() > 1e-2  # training moved the adapters (and the projector)
    record = json.loads((root / "adapters" / "adapter_config.json").read_text())
    assert record["format"] == "megatron_visualchat.adapters/1" and record["lora"]["vision_rank"] == 2


def _apply_to_another_base(base_dir, other_dir, adapters):
    from megatron_visualchat.checkpoint.chat import read_chat_config, save_chat_checkpoint
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.model.visualchat import VisualChatModel

    cfg = read_chat_config(base_dir)
    other = cfg.replace(attention=AttentionConfig(modality_split="kv"))
    save_chat_checkpoint(VisualChatModel(other), VisualChatTokenizer.load(str(base_dir)), other_dir)
    try:
        build_chat_model(other_dir, adapters=adapters)
    except CheckpointError as e:
        return str(e)


def test_adapters_refuse_another_base_and_damage(runs, tmp_path):
    root = runs["root"]
    message = run_parallel(_apply_to_another_base, args=(root / "base", tmp_path / "other", root / "adapters"))[0]
    assert "was trained on another model than the base checkpoint: attention:" in message
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (root / "adapters").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    with open(damaged / "adapters.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RankFailed, match="adapters.safetensors is corrupt \\(checksum mismatch\\)"):
        run_parallel(_chat_logits, args=(root / "base", damaged))
