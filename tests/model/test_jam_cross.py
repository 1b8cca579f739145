"""JAM-Cross end to end: ``fuse --method cross`` writes both parents as towers at any TP/PP; the model built from
its record gives parent A's logits exactly while the gates are closed (and others once they open); the trainer
trains it from ``--model-preset from-llm-load`` and its ``--export-dir`` answers in a chat session; what it cannot
do is refused by name."""

import json

import pytest
import torch

from megatron_visualchat.checkpoint.convert import hf_to_megatron
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse import FullTensorReader, main as fuse_main
from megatron_visualchat.checkpoint.fuse_cross import fuse_cross
from megatron_visualchat.checkpoint.hf_llama import stage_state_keys
from megatron_visualchat.config import ConfigError, ParallelConfig
from megatron_visualchat.testing.distributed import run_parallel

from ..checkpoint.conftest import TINY, hf_logits


def _save_llama(path, seed: int):
    """A random tiny LLaMA (``TINY``, norms randomised too) of 512 tokens: every id of the trainer's tokenizer below
    has trained-looking rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY, vocab_size=512)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.1) if p.ndim == 1 else p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """A at TP=2, B (other weights) at TP=1; their cross fusion at TP=2 x PP=2, cross links after layers 2, 4."""
    root = tmp_path_factory.mktemp("jam_cross")
    hf_a = _save_llama(root / "hf_a", seed=0)
    a = hf_to_megatron(hf_a, root / "a", tp=2, dtype="fp32")
    b = hf_to_megatron(_save_llama(root / "hf_b", seed=3), root / "b", dtype="fp32")
    assert fuse_main(["--method", "cross", "--model-a", str(a), "--model-b", str(b), "--out", str(root / "c"),
                      "--cross-interval", "2", "--tp", "2", "--pp", "2"]) == 0
    return dict(root=root, hf_a=hf_a, a=a, b=b, fused=root / "c")


def test_towers_are_the_parents_tensor_for_tensor(parents):
    names = [k for k, m in stage_state_keys(FullTensorReader(parents["a"]).record.llm, ParallelConfig(), 0) if m]
    for tower, parent in (("tower_a", parents["a"]), ("tower_b", parents["b"])):
        got, want = FullTensorReader(parents["fused"] / tower), FullTensorReader(parent)
        assert got.record.parallel == ParallelConfig(tp=2, pp=2)
        assert all(torch.equal(got.read(n), want.read(n)) for n in names)
    record = json.loads((parents["fused"] / "megatron_visualchat_config.json").read_text())
    assert (record["format"], record["cross_interval"]) == ("megatron_visualchat.jam_cross/1", 2)


def _logits(load_dir: str, tokens: torch.Tensor) -> dict:
    """The fused model's logits at this layout, loaded as the trainer loads it: gates closed, then opened."""
    from megatron_visualchat.config import VisualChatConfig
    from megatron_visualchat.checkpoint.fuse_cross import JamCrossRecord
    from megatron_visualchat.checkpoint.fuse_cross import load_towers
    from megatron_visualchat.model.jam_cross import JamCrossModel
    from megatron_visualchat.model.token_codes import MODALITY_TEXT, pack_token_codes
    from megatron_visualchat.testing.equivalence import current_parallel

    record = JamCrossRecord.find(load_dir)
    model = JamCrossModel(VisualChatConfig(llm=record.llm, fusion=record.fusion, parallel=current_parallel()))
    load_towers(model, load_dir)
    zeros = torch.zeros_like(tokens)
    codes = pack_token_codes(zeros + MODALITY_TEXT, zeros - 1, zeros)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    out = {}
    with torch.no_grad():
        out["closed"] = model(tokens, positions, codes, runtime_gather_output=True)[..., :record.llm.vocab_size]
        for name, p in model.named_parameters():
            if name.endswith("cross_attention.gate"):
                p.fill_(0.5)
        out["open"] = model(tokens, positions, codes, runtime_gather_output=True)[..., :record.llm.vocab_size]
    return out


def test_closed_gates_give_parent_as_logits(parents):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    want = hf_logits(parents["hf_a"], tokens)
    got = run_parallel(_logits, args=(str(parents["fused"]), tokens))[0]  # TP=1: resharded from TP=2 x PP=2
    torch.testing.assert_close(got["closed"], want, rtol=0, atol=1e-5)  # measured: 1.1e-6 (fp32, HF vs megatron)
    assert (got["open"] - want).abs().max() > 1e-2  # the cross links act once the gates open (measured: 3.5e-2)


def test_refusals_name_the_reason(parents, tmp_path):
    narrow = dict(TINY, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**narrow)).save_pretrained(tmp_path / "narrow_hf")
    narrow_mg = hf_to_megatron(tmp_path / "narrow_hf", tmp_path / "narrow", dtype="fp32")
    with pytest.raises(CheckpointError, match="same architecture"):
        fuse_cross(parents["a"], narrow_mg, tmp_path / "out")
    with pytest.raises(CheckpointError, match="exceeds"):
        fuse_cross(parents["a"], parents["b"], tmp_path / "out", cross_interval=5)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(SystemExit, match="--cross-interval spaces"):
        fuse_main(["--method", "width", "--cross-interval", "2", "--model-a", str(parents["a"]), "--model-b",
                   str(parents["b"]), "--out", str(tmp_path / "w")])
    with pytest.raises(CheckpointError, match="jam_cross"):  # tools that expect one converted LLaMA
        FullTensorReader(parents["fused"])


def test_images_and_image_options_are_refused():
    from megatron_visualchat.config import FusionConfig, LoraConfig, VisionConfig, VisualChatConfig
    from megatron_visualchat.model.jam_cross import _check_text_only
    from megatron_visualchat.testing.batches import batch_from_layouts

    jam = FusionConfig(kind="jam-cross", cross_interval=2)
    with pytest.raises(ConfigError, match="vision encoder or projector"):
        VisualChatConfig(fusion=jam, vision=VisionConfig(projector="mlp")).validate()
    with pytest.raises(ConfigError, match="LoRA.*sequence-parallel"):
        VisualChatConfig(fusion=jam, lora=LoraConfig(rank=4),
                         parallel=ParallelConfig(tp=2, sequence_parallel=True)).validate()
    with pytest.raises(ValueError, match="has images"):
        _check_text_only(batch_from_layouts(["tt00tt"], 256)["attention_mask"], None)


# ------------------------------------------------------------------------------------------------- training

def _train_then_chat(argv: list, export: str):
    """Train, export, and (one pipeline stage: inference is tensor-parallel only) answer through a chat session."""
    from megatron.core import parallel_state as ps

    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.inference.session import ChatSession
    from megatron_visualchat.model.jam_cross import JamCrossModel
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    losses = train(parse_args(argv))["losses"]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        return losses, None
    model, tok, _ = build_chat_model(export)
    assert isinstance(model, JamCrossModel)
    session = ChatSession(model, tok, sampling=SamplingParams(max_new_tokens=4, stop_on_eos=False))
    return losses, session.ask("what is 3 plus 3?").token_ids


@pytest.fixture(scope="module")
def train_argv(parents):
    """Text-only conversations and a tokenizer that fits them into the tiny model's 128 positions (its system
    prompt in the corpus); the trainer's flags for the fused checkpoint."""
    from megatron_visualchat.data import train_tiny_sentencepiece
    from megatron_visualchat.data.templates import DSVC_SYSTEM

    root = parents["root"]
    lines = [DSVC_SYSTEM] * 10 + [f"### Human: what is {i} plus {i}?\n### Assistant: it is {2 * i}."
                                  for i in range(40)]
    train_tiny_sentencepiece(str(root / "tok"), lines, 400)
    with open(root / "text.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"rounds": [{"question": f"what is {i} plus {i}?", "answer": f"it is {2 * i}."}]})
                    + "\n")
    return ["--model-preset", "from-llm-load", "--llm-load", str(parents["fused"]), "--tokenizer-dir",
            str(root / "tok"), "--data", f"jsonl:{root / 'text.jsonl'}", "--micro-batch-size", "4",
            "--global-batch-size", "4", "--seq-length", "96", "--train-iters", "4", "--lr", "1e-2", "--seed", "1",
            "--no-progress-bar"]


def test_the_trainer_trains_the_fusion(train_argv, tmp_path):
    argv = train_argv + ["--export-dir", str(tmp_path / "chat")]
    losses, answer = run_parallel(_train_then_chat, args=(argv, str(tmp_path / "chat")))[0]
    assert losses[-1] < losses[0] - 0.5, losses  # measured: 6.43, 6.48, 5.82, 5.24
    assert len(answer) == 4  # the exported fusion talks (tests/inference/test_jam_cross_chat.py checks the decode)
    from megatron_visualchat.checkpoint.hf_llava_export import export_hf

    with pytest.raises(CheckpointError, match="two towers"):  # nor is it exported as a one-decoder HF model
        export_hf(tmp_path / "chat", tmp_path / "hf")
    # Through the optimizer at PP=2 (the [h_A ; h_B] p2p tensor, megatron-core's DDP and schedule): the same losses.
    pp2 = [r for r in run_parallel(_train_then_chat, pp=2, args=(
        train_argv + ["--pipeline-model-parallel-size", "2", "--export-dir", str(tmp_path / "chat2")],
        str(tmp_path / "chat2"))) if r[0]]
    torch.testing.assert_close(torch.tensor(pp2[0][0]), torch.tensor(losses), rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="cross fusion"):  # the record's kind is not silently dropped
        from megatron_visualchat.training.arguments import model_config, parse_args

        model_config(parse_args([a if a != "from-llm-load" else "tiny" for a in argv]), 1)


def test_dry_run_builds_both_towers_at_the_layout(train_argv, capsys):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.dry_run import dry_run

    assert dry_run(parse_args(train_argv + ["--pipeline-model-parallel-size", "2"]), 2) == 0
    out = capsys.readouterr().out
    assert "jam-cross, two towers of 4 layers, a cross link after every 2" in out
    # 2 towers x 4 layers x 36,992 + 2 embeddings and the head's 2 halves of 512 x 64 + 2 final norms + 2 cross
    # links of 2 x 16,513 (q 64x64, kv 128x64, proj 64x64, 2 norms, gate): the links and W_B train
    assert "model total: 493,188 parameters, 98,820 trainable" in out, out
