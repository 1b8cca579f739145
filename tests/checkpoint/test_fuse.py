"""JAM fusion of converted checkpoints (``megatron-visualchat fuse``): uniform is exactly the weighted average
(alpha=1 is model A bit for bit), width's block layout computes each parent's attention and MLP in its half, a
model width-fused with itself keeps its logits, any TP/PP in and out, refusals name the reason, and the trainer
trains the fused architecture from its record at TP=1 and TP=2 alike."""

import json
from pathlib import Path

import pytest
import torch

from megatron_visualchat.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.fuse import FuseOptions, FullTensorReader, fuse_checkpoints, main
from megatron_visualchat.checkpoint.hf_llama import stage_state_keys
from megatron_visualchat.checkpoint.legacy_format import ConversionRecord, rank_file
from megatron_visualchat.config import ParallelConfig
from megatron_visualchat.testing.distributed import run_parallel

from .conftest import hf_logits, save_tiny_llama


@pytest.fixture(scope="module")
def parents(tiny_hf, tmp_path_factory):
    """A at TP=1 and (the same weights) at TP=2 x PP=2; B, other weights, at TP=2."""
    root = tmp_path_factory.mktemp("fuse")
    hf_b = save_tiny_llama(root / "hf_b", seed=3)
    return dict(hf_a=tiny_hf, hf_b=hf_b,
                a=hf_to_megatron(tiny_hf, root / "a", dtype="fp32"),
                a22=hf_to_megatron(tiny_hf, root / "a22", tp=2, pp=2, dtype="fp32"),
                b=hf_to_megatron(hf_b, root / "b", tp=2, dtype="fp32"))


def _names(load_dir: Path) -> list[str]:
    llm = ConversionRecord.load(load_dir).llm
    return [k for k, m in stage_state_keys(llm, ParallelConfig(), 0) if m is not None]


def test_uniform_is_the_weighted_average_at_any_layout(parents, tmp_path):
    out = fuse_checkpoints(parents["a22"], parents["b"], tmp_path / "u", method="uniform",
                           options=FuseOptions(alpha=0.25), tp=2, pp=2)
    fused, a, b = FullTensorReader(out), FullTensorReader(parents["a"]), FullTensorReader(parents["b"])
    for name in _names(out):
        assert torch.equal(fused.read(name), 0.25 * a.read(name) + 0.75 * b.read(name)), name


def test_uniform_alpha_one_is_model_a_bit_for_bit(parents, tmp_path):
    out = fuse_checkpoints(parents["a22"], parents["b"], tmp_path / "u1", method="uniform",
                           options=FuseOptions(alpha=1.0))
    got = torch.load(rank_file(out, 0, 0, 0, 1), weights_only=True)["model"]
    want = torch.load(rank_file(parents["a"], 0, 0, 0, 1), weights_only=True)["model"]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))


def test_width_fused_with_itself_keeps_the_logits(parents, tmp_path):
    """Both halves equal: the joint RMS is each half's, so the fused model is exactly its parent."""
    out = fuse_checkpoints(parents["a"], parents["a22"], tmp_path / "w", method="width", tp=2, pp=2)
    hf = megatron_to_hf(out, tmp_path / "w_hf")
    assert json.loads((hf / "config.json").read_text())["hidden_size"] == 128
    tokens = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    want = hf_logits(parents["hf_a"], tokens)
    torch.testing.assert_close(hf_logits(hf, tokens), want, rtol=0, atol=2e-5)  # measured: 2.4e-6


def _hf_model(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", ["copy", "average"])
def test_width_halves_compute_each_parents_attention_and_mlp(parents, tmp_path, variant):
    """Layer by layer (the norms, the one coupling, left out): the copy model's attention and MLP on [x_A, x_B]
    are [A(x_A), B(x_B)]; the average variant differs from that."""
    fused_hf = megatron_to_hf(fuse_checkpoints(parents["a"], parents["b"], tmp_path / "w", method="width",
                                               options=FuseOptions(variant=variant)), tmp_path / "w_hf")
    fused, a, b = _hf_model(fused_hf), _hf_model(parents["hf_a"]), _hf_model(parents["hf_b"])
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(2, 9, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    x = torch.cat([xa, xb], dim=-1)
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        for layer in range(len(fused.model.layers)):
            def attn(model, h):
                module = model.model.layers[layer].self_attn
                return module(hidden_states=h, position_embeddings=model.model.rotary_emb(h, pos),
                              attention_mask=None)[0]

            def mlp(model, h):
                return model.model.layers[layer].mlp(h)

            for block in (attn, mlp):
                want = torch.cat([block(a, xa), block(b, xb)], dim=-1)
                if variant == "copy":
                    torch.testing.assert_close(block(fused, x), want, rtol=0, atol=1e-5)  # measured: ~1e-7
                else:
                    assert (block(fused, x) - want).abs().max() > 1e-2


@pytest.mark.parametrize("method,options,message", [
    ("uniform", FuseOptions(alpha=1.5), "must lie in"),
    ("width", FuseOptions(variant="average"), "same shape"),
])
def test_refusals_name_the_reason_and_write_nothing(parents, tmp_path, method, options, message, tiny_hf):
    other = tmp_path / "other"
    if message == "same shape":  # a narrower parent B
        from .conftest import TINY
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = dict(TINY, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
        LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp_path / "narrow_hf")
        (tmp_path / "narrow_hf" / "tokenizer_config.json").write_text(
            (tiny_hf / "tokenizer_config.json").read_text())
        other = hf_to_megatron(tmp_path / "narrow_hf", other, dtype="fp32")
    else:
        other = parents["b"]
    with pytest.raises(CheckpointError, match=message):
        fuse_checkpoints(parents["a"], other, tmp_path / "out", method=method, options=options)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_different_vocabularies_are_refused(parents, tmp_path):
    hf = save_tiny_llama(tmp_path / "hf", seed=5)
    (hf / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    other = hf_to_megatron(hf, tmp_path / "c", dtype="fp32")
    with pytest.raises(CheckpointError, match="different vocabularies"):
        fuse_checkpoints(parents["a"], other, tmp_path / "out", method="uniform")


def test_cli_flags_of_the_other_method_are_refused(parents, tmp_path):
    with pytest.raises(SystemExit, match="--alpha weighs"):
        main(["--method", "width", "--alpha", "0.3", "--model-a", str(parents["a"]), "--model-b",
              str(parents["b"]), "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------- training the fusion

def _save_tiny_preset_llama(path: Path, seed: int) -> Path:
    """A random LlamaForCausalLM of the `tiny` preset's shape (the synthetic data's vocabulary fits it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                                 vocab_size=256, intermediate_size=128, max_position_embeddings=512,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False)).save_pretrained(path)
    return path


def _train(argv):
    from megatron_visualchat.training.arguments import parse_args
    from megatron_visualchat.training.pretrain import train

    return train(parse_args(argv))["losses"]


def test_width_fusion_trains_at_tp1_and_tp2_alike(tmp_path):
    parents = [hf_to_megatron(_save_tiny_preset_llama(tmp_path / f"hf{i}", i), tmp_path / f"mg{i}", dtype="fp32")
               for i in range(2)]
    fused = tmp_path / "fused"
    assert main(["--method", "width", "--model-a", str(parents[0]), "--model-b", str(parents[1]),
                 "--out", str(fused)]) == 0
    argv = ["--synthetic", "32", "--data-cache-dir", str(tmp_path / "data"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "160", "--train-iters", "2", "--no-progress-bar",
            "--model-preset", "from-llm-load", "--llm-load", str(fused), "--trainable", "projector"]
    tp1 = run_parallel(_train, args=(argv,))[0]
    tp2 = run_parallel(_train, tp=2, args=(argv + ["--tensor-model-parallel-size", "2"],))[0]
    assert len(tp1) == 2 and all(torch.isfinite(torch.tensor(tp1)))
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(tp1), rtol=1e-5, atol=0)
