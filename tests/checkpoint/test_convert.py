"""HF -> Megatron -> HF is bit-exact, .bin inputs convert like safetensors, every refusal happens before anything is
written, a full disk is reported as such (exit 1) with the partial output removed, and the CLI entry points
(console script, tools/convert_checkpoint.py) work."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron_visualchat import cli
from megatron_visualchat.checkpoint import convert
from megatron_visualchat.checkpoint.convert import VISION_NOTE, hf_to_megatron, main, megatron_to_hf, parse_size
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.legacy_format import RankFileWriter, rank_file

from .conftest import hf_logits

REPO = Path(__file__).resolve().parents[2]


def _hf_state(hf_dir: Path) -> dict:
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _rank_states(load_dir: Path, tp: int, pp: int) -> dict:
    return {(t, s): torch.load(rank_file(load_dir, 0, t, s, pp), weights_only=True)["model"]
            for t in range(tp) for s in range(pp)}


@pytest.mark.parametrize("tp,pp,pp_layers", [(2, 2, None), (1, 2, (3, 1))])
def test_round_trip_is_bit_exact(tiny_hf_bf16, tmp_path, tp, pp, pp_layers):
    mg = hf_to_megatron(tiny_hf_bf16, tmp_path / "mg", tp=tp, pp=pp, pp_layers=pp_layers)
    back = megatron_to_hf(mg, tmp_path / "hf", max_shard_size="30KB")
    original, returned = _hf_state(tiny_hf_bf16), _hf_state(back)
    assert sorted(original) == sorted(returned)
    for name, t in original.items():
        assert returned[name].dtype == t.dtype == torch.bfloat16 and torch.equal(returned[name], t), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and sorted(index["weight_map"]) == sorted(original)
    assert all((back / f).is_file() for f in index["weight_map"].values())
    assert json.loads((back / "config.json").read_text()) == json.loads((tiny_hf_bf16 / "config.json").read_text())
    for side in ("tokenizer_config.json", "generation_config.json"):
        assert (back / side).read_text() == (tiny_hf_bf16 / side).read_text()


def test_rank_files_have_megatron_shapes_and_padding(tiny_hf, tmp_path):
    mg = hf_to_megatron(tiny_hf, tmp_path / "mg", tp=2, pp=2, dtype="fp32")
    states = _rank_states(mg, 2, 2)
    emb = states[(1, 0)]["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 64) and emb.dtype == torch.float32  # vocab 250 padded to 256, split in two
    assert torch.count_nonzero(emb[-6:]) == 0  # padded rows
    assert states[(0, 1)]["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (64, 64)  # 1 group: 2q+k+v
    assert states[(0, 1)]["decoder.layers.1.mlp.linear_fc1.weight"].shape == (128, 64)
    assert states[(0, 1)]["decoder.layers.1.self_attention.linear_proj.weight"].shape == (64, 32)
    checkpoint = torch.load(rank_file(mg, 0, 1, 1, 2), weights_only=True)
    assert checkpoint["checkpoint_version"] == 3.0 and checkpoint["iteration"] == 0
    assert checkpoint["args"]["tensor_model_parallel_size"] == 2 and checkpoint["args"]["padded_vocab_size"] == 256
    assert (mg / "latest_checkpointed_iteration.txt").read_text() == "0"


def test_dtype_conversion_and_export_loads_in_transformers(tiny_hf, tmp_path):
    mg = hf_to_megatron(tiny_hf, tmp_path / "mg", tp=2, pp=1, dtype="bf16")
    back = megatron_to_hf(mg, tmp_path / "hf")
    original, returned = _hf_state(tiny_hf), _hf_state(back)
    for name, t in original.items():
        assert torch.equal(returned[name], t.bfloat16()), name
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = megatron_to_hf(mg, tmp_path / "hf32", dtype="fp32")
    tokens = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(tiny_hf, tokens)
    torch.testing.assert_close(hf_logits(fp32, tokens), expected, rtol=0.05, atol=0.05)  # bf16 weights


def _write_bin_variants(src: Path, root: Path) -> tuple[Path, Path]:
    state = _hf_state(src)
    single, sharded = root / "single", root / "sharded"
    for d in (single, sharded):
        d.mkdir(parents=True)
        shutil.copy(src / "config.json", d / "config.json")
    torch.save(state, single / "pytorch_model.bin")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / fname)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return single, sharded


def test_bin_checkpoints_convert_like_safetensors(tiny_hf, tmp_path):
    reference = _rank_states(hf_to_megatron(tiny_hf, tmp_path / "ref", tp=2, pp=2, dtype="fp32"), 2, 2)
    for i, hf_dir in enumerate(_write_bin_variants(tiny_hf, tmp_path / "bin")):
        states = _rank_states(hf_to_megatron(hf_dir, tmp_path / f"out{i}", tp=2, pp=2, dtype="fp32"), 2, 2)
        for rank, state in reference.items():
            assert list(states[rank]) == list(state)
            assert all(v is None and states[rank][k] is None or torch.equal(states[rank][k], v)
                       for k, v in state.items())


class NotAWeight:
    """Stands for arbitrary pickled code in a .bin."""


def test_unsafe_bin_is_refused(tmp_path):
    hf_dir = tmp_path / "evil"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    # A global no allowlist knows (megatron-core itself allowlists pathlib.PosixPath, Namespace, ... on import).
    torch.save({"w": torch.ones(1), "obj": NotAWeight()}, hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        hf_to_megatron(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- refusals, nothing written

def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_index(edit_map):
    def edit(d: Path):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        edit_map(d, index["weight_map"])
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


def _delete_shard(d: Path):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / index["weight_map"]["model.layers.2.mlp.up_proj.weight"]).unlink()


def _add_bias(d: Path, weight_map):
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(d / "extra.safetensors"))
    weight_map["model.layers.0.self_attn.q_proj.bias"] = "extra.safetensors"


def _misassign(d: Path, weight_map):
    weight_map["model.norm.weight"] = weight_map["model.embed_tokens.weight"]


REFUSALS = [
    ("tp-heads", None, dict(tp=3), "tensor parallel size 3 does not divide num_attention_heads=4"),
    ("tp-groups", None, dict(tp=4), "tensor parallel size 4 does not divide num_query_groups=2"),
    ("tp-ffn", _edit_config(intermediate_size=129), dict(tp=2), "does not divide ffn_hidden_size=129"),
    ("pp-layers", None, dict(pp=3), "pipeline size pp=3 does not divide num_layers=4"),
    ("pp-split", None, dict(pp=2, pp_layers=(1, 1)), r"pp_layers=\[1, 1\] sums to 2"),
    ("missing-shard", _delete_shard, {}, "names shard files that are missing"),
    ("missing-tensor", _edit_index(lambda d, m: m.pop("model.layers.2.mlp.up_proj.weight")), {},
     "missing tensors: model.layers.2.mlp.up_proj.weight"),
    ("misassigned", _edit_index(_misassign), {}, "lacks tensors its index assigns to it: model.norm.weight"),
    ("wrong-shape", _edit_config(num_key_value_heads=4), {}, r"model.layers.0.self_attn.k_proj.weight \(32, 64\)"),
    ("extra-tensor", _edit_index(_add_bias), {}, "would be dropped.*q_proj.bias"),
    ("rope-scaling", _edit_config(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}), {},
     "rope_type='llama3' is not supported"),
    ("architecture", _edit_config(architectures=["Qwen2ForCausalLM"]), {}, "architectures"),
    ("no-config", lambda d: (d / "config.json").unlink(), {}, "config.json not found"),
    ("dtype", None, dict(dtype="fp8"), "dtype='fp8' is not one of"),
]


@pytest.mark.parametrize("edit,kwargs,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_write_nothing(tiny_hf, tmp_path, edit, kwargs, message):
    hf_dir = shutil.copytree(tiny_hf, tmp_path / "hf")
    if edit:
        edit(hf_dir)
    with pytest.raises(ValueError, match=message):
        hf_to_megatron(hf_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_needs_force(tiny_hf, tmp_path):
    out = tmp_path / "out"
    (out / "iter_0000000" / "mp_rank_07").mkdir(parents=True)  # a stale rank of an earlier conversion
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        hf_to_megatron(tiny_hf, out, tp=2)
    assert sorted(p.name for p in out.rglob("*")) == ["iter_0000000", "mp_rank_07", "notes.txt"]
    hf_to_megatron(tiny_hf, out, tp=2, force=True)
    assert not (out / "iter_0000000" / "mp_rank_07").exists() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "iter_0000000").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    with pytest.raises(CheckpointError, match="is the input directory"):
        hf_to_megatron(tiny_hf, tiny_hf, force=True)


def test_megatron_to_hf_refusals_write_nothing(tiny_hf, tmp_path):
    mg = hf_to_megatron(tiny_hf, tmp_path / "mg", tp=2, pp=2)
    rank_file(mg, 0, 1, 1, 2).unlink()
    with pytest.raises(CheckpointError, match=r"missing rank files .*mp_rank_01_001"):
        megatron_to_hf(mg, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="was not written by hf-to-megatron"):
        megatron_to_hf(tmp_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _fails_after(real, calls: int, error: Exception):
    """``real`` until it has run ``calls`` times, then ``error`` (a disk that fills up half-way)."""
    done = []

    def call(*args, **kwargs):
        if len(done) == calls:
            raise error
        done.append(calls)
        return real(*args, **kwargs)
    return call


def test_full_disk_is_reported_as_such_and_leaves_no_partial_files(tiny_hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mg"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(RankFileWriter, "write", _fails_after(RankFileWriter.write, 5,
                                                              OSError(errno.ENOSPC, "No space left on device")))
    assert main(["hf-to-megatron", "--hf-dir", str(tiny_hf), "--out", str(out), "--tp", "2", "--force"]) == 1
    err = capsys.readouterr().err
    assert f"hf-to-megatron: error: No space left on device ({out}); the partial output in {out} was removed: " \
           f"free space on the filesystem of {out} or choose another --out" in err
    assert "never written" not in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    monkeypatch.undo()

    mg = hf_to_megatron(tiny_hf, tmp_path / "mg2")
    hf = tmp_path / "hf"
    # safetensors 0.8 reports a failed write as a SafetensorError naming the OS error (seen for ENOENT: "(os error 2)")
    monkeypatch.setattr(convert, "save_file", _fails_after(convert.save_file, 1, SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at path "x"')))
    assert main(["megatron-to-hf", "--load", str(mg), "--out", str(hf), "--max-shard-size", "30KB"]) == 1
    assert "megatron-to-hf: error: No space left on device (" in capsys.readouterr().err
    assert list(hf.iterdir()) == []  # the first shard, written as *.partial.safetensors, is gone


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5 MiB") == 1572864 and parse_size("100") == 100
    with pytest.raises(ValueError, match="'2TB'"):
        parse_size("2TB")


# ------------------------------------------------------------------------------------------------- CLI

def test_console_script_commands(tiny_hf, tmp_path, capsys):
    out = tmp_path / "mg"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(tiny_hf), "--out", str(out), "--tp", "2", "--pp", "2",
                     "--pp-layers", "1,3", "--dtype", "fp32"]) == 0
    record = json.loads((out / "megatron_visualchat_config.json").read_text())
    assert (record["tp"], record["pp"], record["pp_layers"], record["dtype"]) == (2, 2, [1, 3], "fp32")
    assert cli.main(["megatron-to-hf", "--load", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["hf-to-megatron", "--hf-dir", str(tiny_hf), "--out", str(out)]) == 2
    assert "hf-to-megatron: error: output directory" in capsys.readouterr().err
    assert main(["hf-to-megatron", "--hf-dir", str(tiny_hf), "--out", str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "does not divide num_attention_heads=4" in capsys.readouterr().err


def test_tool_wrapper_help_mentions_vision_weights():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-megatron",
                             "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--pp-layers" in result.stdout and "load_encoder_weights" in result.stdout
    assert "load_encoder_weights" in VISION_NOTE
