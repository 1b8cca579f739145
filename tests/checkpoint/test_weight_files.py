"""Weight files read tensor by tensor: torch pickles (wrappers unwrapped, nothing but weights unpickled),
safetensors, HF directories with one file or an index; refusals name the path."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.weight_files import HFWeights, TorchFile


def _state():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g).bfloat16()}


def _assert_reads(weights, state):
    assert sorted(weights) == sorted(state) and len(weights) == len(state)
    for name, t in state.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t)


def test_single_files_and_wrapped_pickles(tmp_path):
    state = _state()
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pth")
    _assert_reads(HFWeights(tmp_path / "w.safetensors"), state)
    _assert_reads(HFWeights(tmp_path / "w.pth"), state)
    assert TorchFile(tmp_path / "w.pth").shapes() == {"a.weight": (3, 4), "b.bias": (5,)}


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_hf_directory_with_an_index(tmp_path, suffix):
    state = _state()
    files = {"a.weight": f"part-1.{suffix}", "b.bias": f"part-2.{suffix}"}
    for name, file in files.items():
        if suffix == "safetensors":
            save_file({name: state[name]}, tmp_path / file)
        else:
            torch.save({name: state[name]}, tmp_path / file)
    index = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"weight_map": files}))
    weights = HFWeights(tmp_path)
    _assert_reads(weights, state)
    assert weights.weight_map["b.bias"] == tmp_path / files["b.bias"] and "c" not in weights
    (tmp_path / files["b.bias"]).unlink()
    with pytest.raises(CheckpointError, match=f"names shard files that are missing .*part-2.{suffix}"):
        HFWeights(tmp_path)


def test_refusals_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="absent not found"):
        HFWeights(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no weights .*model.safetensors"):
        HFWeights(tmp_path)
    torch.save({"w": torch.ones(1), "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read with torch.load\\(weights_only=True\\)"):
        HFWeights(tmp_path / "evil.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: expected a state dict, found list"):
        TorchFile(tmp_path / "list.pt")
