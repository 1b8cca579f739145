"""Chat checkpoints: config round trip, save at TP=1 -> load at TP=2 -> save again gives the same tensors (vocab
padding recomputed), a model split over pipeline stages saves the same file, and files that do not match the model
are refused with the tensor named."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_visualchat.checkpoint.chat import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    config_from_dict,
    config_to_dict,
    read_chat_config,
    save_chat_checkpoint,
)
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.config import AttentionConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.inference.checkpoint import build_chat_model
from megatron_visualchat.testing.distributed import RankFailed, run_parallel

from .tiny import build_model


def test_config_round_trip_and_unknown_keys():
    cfg = VisualChatConfig(attention=AttentionConfig(mode="causal", modality_split="kv", image_rows="image"),
                           vision=VisionConfig(projector="mlp"))
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert "parallel" not in data and config_from_dict(data) == cfg
    data["attention"]["window"] = 3
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['window'\] in section 'attention'"):
        config_from_dict(data)
    del data["attention"]["window"]
    data["attention"]["mode"] = "flash"
    with pytest.raises(ValueError, match="attention.mode='flash'"):
        config_from_dict(data)
    with pytest.raises(CheckpointError, match="section 'llm' is incomplete"):
        config_from_dict({"attention": {}})


def _resave(load_dir, out_dir):
    model, tok, cfg = build_chat_model(load_dir)
    save_chat_checkpoint(model, tok, out_dir)
    return cfg.parallel.tp, model.language_model.embedding.word_embeddings.weight.shape[0]


def test_save_load_across_tensor_parallel_sizes(chat_ckpt, tmp_path):
    results = run_parallel(_resave, tp=2, args=(chat_ckpt, str(tmp_path)))
    assert [r[0] for r in results] == [2, 2]
    original, resaved = load_file(f"{chat_ckpt}/{WEIGHTS_FILE}"), load_file(str(tmp_path / WEIGHTS_FILE))
    assert original.keys() == resaved.keys() and any("image_weight" in k for k in original)
    vocab = read_chat_config(chat_ckpt).llm.vocab_size
    for name, t in original.items():
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert resaved[name].shape[0] == 2 * results[0][1]  # padded for TP=2
            torch.testing.assert_close(resaved[name][:vocab], t[:vocab], rtol=0, atol=0)
            assert not resaved[name][vocab:].any()
        else:
            torch.testing.assert_close(resaved[name], t, rtol=0, atol=0, msg=name)
    assert (tmp_path / "tokenizer.model").read_bytes() == open(f"{chat_ckpt}/tokenizer.model", "rb").read()


def _resave_pipelined(load_dir, out_dir):
    """The checkpoint's weights in a model split over this run's pipeline stages, saved again."""
    from megatron_visualchat.data import VisualChatTokenizer
    from megatron_visualchat.testing.equivalence import current_parallel

    cfg = read_chat_config(load_dir).replace(parallel=current_parallel())
    model = build_model(cfg, full_state=load_file(f"{load_dir}/{WEIGHTS_FILE}"))
    save_chat_checkpoint(model, VisualChatTokenizer.load(load_dir), out_dir)


def test_save_merges_pipeline_stages(chat_ckpt, tmp_path):
    run_parallel(_resave_pipelined, pp=2, args=(chat_ckpt, str(tmp_path)))
    original, resaved = load_file(f"{chat_ckpt}/{WEIGHTS_FILE}"), load_file(str(tmp_path / WEIGHTS_FILE))
    assert original.keys() == resaved.keys()
    for name, t in original.items():
        torch.testing.assert_close(resaved[name], t, rtol=0, atol=0, msg=name)
    assert read_chat_config(tmp_path) == read_chat_config(chat_ckpt)


def _load(load_dir):
    build_chat_model(load_dir)


def test_mismatched_files_are_refused(chat_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(chat_ckpt, bad)
    weights = load_file(str(bad / WEIGHTS_FILE))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(bad / WEIGHTS_FILE))
    with pytest.raises(RankFailed, match=f"missing \\['{dropped}'\\]"):
        run_parallel(_load, args=(str(bad),))
    name = next(k for k in weights if k.endswith("linear_proj.weight"))
    save_file({**weights, name: weights[name][:, :-1].contiguous()}, str(bad / WEIGHTS_FILE))
    with pytest.raises(RankFailed, match=f"tensor {name} has shape"):
        run_parallel(_load, args=(str(bad),))
    (bad / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="visualchat_config.json not found"):
        read_chat_config(bad)
