"""The legacy layout on disk (paths, record, streamed rank files) and load_megatron_checkpoint: a converted
tiny HF LLaMA gives transformers' logits in megatron-core's GPTModel at TP=2 x PP=2, and at other layouts through
on-the-fly resharding."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_visualchat.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llama import llm_config_from_hf
from megatron_visualchat.checkpoint.legacy_format import (
    RECORD_FILE,
    ConversionRecord,
    RankFileWriter,
    adapt_keys,
    rank_file,
)
from megatron_visualchat.checkpoint.weight_files import TorchFile
from megatron_visualchat.config import LLM_PRESETS, ParallelConfig, VisualChatConfig
from megatron_visualchat.testing.distributed import run_parallel

from .conftest import hf_logits, save_tiny_llama

SEQ, MBS = 12, 2


def test_rank_file_names(tmp_path):
    assert rank_file(tmp_path, 0, 1, 0, 1) == tmp_path / "iter_0000000/mp_rank_01/model_optim_rng.pt"
    assert rank_file(tmp_path, 0, 3, 2, 4) == tmp_path / "iter_0000000/mp_rank_03_002/model_optim_rng.pt"
    assert rank_file(tmp_path, "release", 0, 0, 1) == tmp_path / "release/mp_rank_00/model_optim_rng.pt"


def test_record_round_trip_and_errors(tmp_path):
    record = ConversionRecord(llm=LLM_PRESETS["tiny"], tp=2, pp=2, pp_layers=(1, 3), dtype="bf16",
                              hf_config={"a": 1})
    record.save(tmp_path)
    assert ConversionRecord.load(tmp_path) == record
    data = json.loads((tmp_path / RECORD_FILE).read_text())
    data["pp_layers"] = [1, 1]
    (tmp_path / RECORD_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="pp_layers"):
        ConversionRecord.load(tmp_path)
    with pytest.raises(CheckpointError, match="not written by hf-to-megatron"):
        ConversionRecord.load(tmp_path / "elsewhere")


def test_streamed_rank_file_is_a_plain_torch_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 4, generator=g).bfloat16(), "b": torch.randn(5, generator=g),
               "c": torch.randn(3, 2, 2, generator=g).half()}
    layout = {"a": ((6, 4), torch.bfloat16), "none": None, "b": ((5,), torch.float32), "c": ((3, 2, 2), torch.float16)}
    path = tmp_path / "r" / "model_optim_rng.pt"
    with RankFileWriter(path, layout, {"args": {"x": 1}, "iteration": 0}) as w:
        w.write("c", [tensors["c"]])
        w.write("a", [tensors["a"][:2], tensors["a"][2:].clone()])  # row blocks
        w.write("b", [tensors["b"]])
        with pytest.raises(ValueError, match=r"a expects \(6, 4\)"):
            w.write("a", [tensors["a"][:5]])
    loaded = torch.load(path, weights_only=True)
    assert loaded["args"] == {"x": 1} and loaded["model"]["none"] is None
    assert list(loaded["model"]) == list(layout)
    reader = TorchFile(path)
    for name, t in tensors.items():
        assert torch.equal(loaded["model"][name], t) and loaded["model"][name].dtype == t.dtype
        assert torch.equal(reader.read(name), t)
    with pytest.raises(CheckpointError, match="tensor zz is missing"):
        reader.read("zz")


def test_writer_refuses_to_finish_with_unwritten_tensors(tmp_path):
    w = RankFileWriter(tmp_path / "f.pt", {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}, {})
    w.write("a", [torch.ones(2)])
    with pytest.raises(RuntimeError, match=r"never written: \['b'\]"):
        w.close()


def test_reader_handles_views_sharing_a_storage(tmp_path):
    """Checkpoints saved by torch.save from views (e.g. params in a contiguous buffer) read back correctly."""
    buf = torch.arange(40, dtype=torch.float32)
    state = {"model": {"w": buf[4:16].view(3, 4), "t": buf[16:28].view(4, 3).t(), "x": None}}
    torch.save(state, tmp_path / "f.pt")
    reader = TorchFile(tmp_path / "f.pt")
    assert torch.equal(reader.read("w"), state["model"]["w"])
    assert torch.equal(reader.read("t"), state["model"]["t"])
    assert reader.read("x") is None


def test_adapt_keys_for_the_transformer_engine_spec():
    state = {"decoder.layers.0.input_layernorm.weight": 1, "decoder.layers.0.pre_mlp_layernorm.weight": 2,
             "decoder.layers.0.mlp.linear_fc1.weight": 3}
    te_model = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 0,
                "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 0, "decoder.layers.0.mlp.linear_fc1.weight": 0,
                "decoder.layers.0.self_attention.core_attention._extra_state": "te"}
    assert adapt_keys(state, te_model) == {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 2, "decoder.layers.0.mlp.linear_fc1.weight": 3,
        "decoder.layers.0.self_attention.core_attention._extra_state": "te"}
    local_model = {k: 0 for k in state}
    assert adapt_keys(state, local_model) == state


# ----------------------------------------------------------------------------- loading into the GPT model

def _forward_logits_step(data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], None)
    return logits, lambda out: (out.float().sum() * 0.0, {"logits": out.detach()})


def _load_and_run(load_dir, llm, tokens, pp_layers):
    """On every rank: build this rank's GPTModel, load the converted checkpoint, run the forward pass; the last
    stage returns its TP slice of the logits."""
    from megatron.core import parallel_state as ps

    from megatron_visualchat.checkpoint.legacy_format import load_megatron_checkpoint
    from megatron_visualchat.model.gpt import build_gpt_model
    from megatron_visualchat.training.step import run_schedule

    par = ParallelConfig(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                         pp_layers=pp_layers)
    model = build_gpt_model(VisualChatConfig(llm=llm, parallel=par)).eval()
    result = load_megatron_checkpoint(model, load_dir)
    assert not result.missing_keys and not result.unexpected_keys
    batch = dict(tokens=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens))
    with torch.no_grad():
        out = run_schedule([model], [batch], num_microbatches=1, seq_length=tokens.shape[1],
                           micro_batch_size=tokens.shape[0], forward_step=_forward_logits_step, forward_only=True)
    logits = out[0]["logits"] if out else None
    return ps.get_tensor_model_parallel_rank(), logits


def _gathered_logits(results, vocab_size):
    last = sorted((r, t) for r, t in results if t is not None)
    return torch.cat([t for _, t in last], dim=-1)[..., :vocab_size]


def _tokens(vocab_size):
    return torch.randint(0, vocab_size, (MBS, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    """The fp32 tiny LLaMA converted to TP=2 x PP=2, its LLMConfig and transformers' logits."""
    out = hf_to_megatron(tiny_hf, tmp_path_factory.mktemp("mg") / "tp2pp2", tp=2, pp=2, dtype="fp32")
    llm = llm_config_from_hf(json.loads((tiny_hf / "config.json").read_text()))
    tokens = _tokens(llm.vocab_size)
    return out, llm, tokens, hf_logits(tiny_hf, tokens)


@pytest.mark.parametrize("tp,pp,pp_layers", [(2, 2, None), (1, 1, None), (2, 2, (1, 3))],
                         ids=["same-layout", "reshard-tp1pp1", "reshard-uneven-pp"])
def test_converted_checkpoint_gives_transformers_logits(converted, tp, pp, pp_layers):
    load_dir, llm, tokens, expected = converted
    results = run_parallel(_load_and_run, tp=tp, pp=pp, pp_layers=pp_layers, args=(load_dir, llm, tokens, pp_layers))
    logits = _gathered_logits(results, llm.vocab_size)  # [b, s, V] like transformers
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # the comparison is meaningful: logits are far from constant


def test_tied_embeddings_load_at_pp2(tmp_path):
    """A tied-embedding checkpoint: megatron keeps a copy on the last stage at PP>1, filled from embed_tokens."""
    hf_dir = save_tiny_llama(tmp_path / "tied", tie=True, seed=3)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["tie_word_embeddings"]
    llm = llm_config_from_hf(config)
    load_dir = hf_to_megatron(hf_dir, tmp_path / "mg", tp=1, pp=2, dtype="fp32")
    tokens = _tokens(llm.vocab_size)
    results = run_parallel(_load_and_run, tp=1, pp=2, args=(load_dir, llm, tokens, None))
    logits = _gathered_logits(results, llm.vocab_size)
    expected = hf_logits(hf_dir, tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    back = megatron_to_hf(load_dir, tmp_path / "back")  # the last stage's copy is not exported as lm_head
    original = {k: v for f in hf_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    returned = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "lm_head.weight" not in returned and sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], v) for k, v in original.items())


def _load_mismatched(load_dir, llm):
    from megatron_visualchat.checkpoint.legacy_format import load_megatron_checkpoint
    from megatron_visualchat.model.gpt import build_gpt_model

    model = build_gpt_model(VisualChatConfig(llm=llm))
    try:
        load_megatron_checkpoint(model, load_dir)
    except CheckpointError as e:
        return str(e)
    return None


def test_architecture_mismatch_names_both_values(converted):
    load_dir, llm, _, _ = converted
    other = dataclasses.replace(llm, num_layers=2, ffn_hidden_size=64)
    [message] = run_parallel(_load_mismatched, args=(load_dir, other))
    assert "num_layers=4 in the checkpoint but 2 in the model" in message
    assert "ffn_hidden_size=128 in the checkpoint but 64 in the model" in message
