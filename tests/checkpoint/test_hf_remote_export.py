"""export-hf of models transformers' LLaVA cannot compute: the trust_remote_code directory (tiny random chat
models, fp32, no downloads). transformers loads it with ``AutoModelForCausalLM.from_pretrained(trust_remote_code=
True)``; its logits on prompts with 0, 1 and 3 images equal our model's, and its greedy ``generate`` (KV cache)
gives our chat's tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from megatron_visualchat.checkpoint.chat import CONFIG_FILE, IMAGE_TOKENIZER_FILE, config_to_dict
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llava_export import export_hf
from megatron_visualchat.checkpoint.hf_llava_export import main as export_main
from megatron_visualchat.checkpoint.hf_remote_export import AUTO_MAP, TEMPLATE_FILES
from megatron_visualchat.config import LLM_PRESETS, AttentionConfig, VisionConfig, VisualChatConfig
from megatron_visualchat.testing.distributed import run_parallel
from tests.inference.tiny import build_model, tiny_cfg, train_tokenizer

# (text before, then per image: its text after) -> prompts with 0, 1 and 3 images
PROMPTS = ((5,), (3, 4), (2, 3, 1, 4))
GREEDY = 10  # new tokens compared with transformers' greedy generate on the 3-image prompt
RTOL = 1e-6  # measured: 0 (fp32, the same float32 operations); 1e-6 leaves room for another BLAS order
# name -> (tiny_cfg attention options, vision options): MMCA with split q/k/v/o, modality norms and image rows that
# also see earlier text (CLIP tower, linear projector); MMCA with split k/v, bidirectional rows inside each image
# and the "mean" combine (SigLIP tower's penultimate layer, pool-adapter projector); DS-VisualChat's own model,
# plain MMCA on QWen-VL's encoder + resampler with the linear projector. LLaVA computes none of them.
VARIANTS = {
    "mmca-qkvo-norms-selftext-clip-linear": (("mmca", "qkvo", "self+text", "sum", "modality-norms"), {}),
    "mmca-kv-image-mean-siglip-pool": (("mmca", "kv", "image", "mean"),
                                       {"encoder": "tiny-siglip", "encoder_options": {"feature_layer": -2},
                                        "projector": "pool_adapter", "projector_options": {"pool_out": 2}}),
    "mmca-qwen-linear": (("mmca",), {"encoder": "tiny-qwen"}),
}


def _cfg(vocab_size: int, variant: str):
    attention, vision = VARIANTS[variant]
    cfg = tiny_cfg(vocab_size, *attention)
    return cfg.replace(vision=dataclasses.replace(cfg.vision, **vision))


def _save(tok_dir: str, out: str, variant: str) -> None:
    from megatron_visualchat.checkpoint.chat import save_chat_checkpoint
    from megatron_visualchat.data import VisualChatTokenizer

    tok = VisualChatTokenizer.load(tok_dir)
    save_chat_checkpoint(build_model(_cfg(tok.vocab_size, variant)), tok, out)


def _prompt(shape, image_id: int, per_image: int, seed: int):
    """(ids with each image as ``per_image`` <image> ids, modality, image index, pixels [N, 3, 32, 32])."""
    g = torch.Generator().manual_seed(seed)
    ids, modality, image = [1], [1], [-1]
    for i, n in enumerate(shape):
        if i:
            ids += [image_id] * per_image
            modality += [2] * per_image
            image += [i - 1] * per_image
        ids += torch.randint(3, image_id, (n,), generator=g).tolist()
        modality += [1] * n
        image += [-1] * n
    pixels = torch.randn(len(shape) - 1, 3, 32, 32, generator=g)
    return torch.tensor([ids]), torch.tensor([modality]), torch.tensor([image]), pixels


def _ours(chat_dir: str, per_image: int):
    """Our logits on PROMPTS and our chat's greedy tokens after the last one (KV-cache decoding)."""
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.generation import generate
    from megatron_visualchat.inference.kv_cache import KVCache
    from megatron_visualchat.inference.prompt import Chunk
    from megatron_visualchat.inference.sampling import SamplingParams
    from megatron_visualchat.model.token_codes import pack_token_codes

    model, tok, _ = build_chat_model(chat_dir)
    logits = []
    with torch.no_grad():
        for seed, shape in enumerate(PROMPTS):
            ids, modality, image, pixels = _prompt(shape, tok.image_id, per_image, seed)
            out = model(ids, torch.arange(ids.shape[1])[None], pack_token_codes(modality, image),
                        pixel_values=pixels if len(pixels) else None, num_images=torch.tensor([len(pixels)]),
                        runtime_gather_output=True)
            logits.append(out[0].float())
    gen = generate(model, KVCache(1, 128), Chunk(ids, modality, image, pixels, torch.tensor([len(pixels)])),
                   SamplingParams(max_new_tokens=GREEDY), eos_id=tok.eos_id, vocab_size=tok.vocab_size,
                   pad_id=tok.pad_id, banned_ids=(tok.image_id, tok.pad_id))
    return logits, gen.tokens[0]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """trust_remote_code copies the modeling files into HF_MODULES_CACHE: a temporary one, not the home dir (one for
    the module: Python keeps the first ``transformers_modules`` package it imports)."""
    import transformers.dynamic_module_utils as dynamic

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remote_export_gives_our_logits_and_greedy_chat(variant, tok_dir, tmp_path, modules_cache):
    from transformers import AutoModelForCausalLM, AutoProcessor

    chat, hf = tmp_path / "chat", tmp_path / "hf"
    run_parallel(_save, args=(tok_dir, str(chat), variant))
    assert export_main(["--load", str(chat), "--out", str(hf), "--max-shard-size", "100KB"]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and all((hf / name).is_file() for name in TEMPLATE_FILES)
    assert len(set(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    per_image, image_id = config["image_seq_length"], config["image_token_index"]

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=torch.float32).eval()
    ours, our_tokens = run_parallel(_ours, args=(str(chat), per_image))[0]
    errors = []
    with torch.no_grad():
        for seed, shape in enumerate(PROMPTS):
            ids, _, _, pixels = _prompt(shape, image_id, per_image, seed)
            theirs = model(input_ids=ids, pixel_values=pixels if len(pixels) else None).logits[0]
            mine = ours[seed][:, :theirs.shape[-1]]
            assert torch.isfinite(theirs).all()
            errors.append(float((mine - theirs).abs().max() / theirs.abs().max()))
        tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=GREEDY, do_sample=False,
                                suppress_tokens=[image_id, config["text_config"]["pad_token_id"]])
    print(f"{variant}: max relative logit difference per prompt {errors}")
    assert max(errors) <= RTOL, errors
    assert tokens[0, ids.shape[1]:].tolist() == our_tokens

    # the processor expands <image> to the model's count of image tokens
    image = Image.fromarray(torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8).numpy())
    processed = AutoProcessor.from_pretrained(hf, trust_remote_code=True)(images=[image], text="<image>\nhi",
                                                                         return_tensors="pt")
    assert int((processed["input_ids"] == image_id).sum()) == per_image

    # weights that do not match the config are refused, naming a tensor (extra image-side norms, or missing ones)
    ours_config = json.loads((chat / CONFIG_FILE).read_text())
    norms = ours_config["attention"]["modality_norms"]
    ours_config["attention"]["modality_norms"] = not norms
    (chat / CONFIG_FILE).write_text(json.dumps(ours_config))
    with pytest.raises(CheckpointError, match="have no place" if norms else "has no tensor .*layernorm.image_weight"):
        export_hf(chat, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_what_neither_export_computes_is_refused(tmp_path, capsys):
    chat = tmp_path / "chat"  # the reasons come from the config alone, before any weight is read
    chat.mkdir()
    cfg = VisualChatConfig(llm=dataclasses.replace(LLM_PRESETS["tiny"], untie_embeddings=False),
                           attention=AttentionConfig(mode="mmca"),
                           vision=VisionConfig(encoder="tiny-eva", projector="perceiver"))
    (chat / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg)))
    record = chat / IMAGE_TOKENIZER_FILE  # a model that draws images as codes
    record.write_text(json.dumps({"name": "tiny-vq", "fingerprint": "0"}))
    with pytest.raises(CheckpointError, match="writes images as codes"):
        export_hf(chat, tmp_path / "hf")
    record.unlink()
    assert export_main(["--load", str(chat), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    for reason in ("nor as the trust_remote_code model", "projector='perceiver'", "encoder='tiny-eva'",
                   "untie_embeddings=False", "attention.mode='mmca'"):
        assert reason in err, err
    assert not (tmp_path / "hf").exists()


def test_remote_attention_equals_the_dense_reference(modules_cache):
    """modeling_visualchat.py's attention function against model/mmca/reference.py for every mode, image_rows and
    combine: a layout with two images, text before the first, pads at the end, GQA; whole rows and decode-style
    queries (the last positions only)."""
    import itertools
    import sys

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from megatron_visualchat.checkpoint.hf_remote_export import MODEL_CLASS, TEMPLATE_DIR
    from megatron_visualchat.config import COMBINES, CORE_ATTENTION_MODES, IMAGE_ROWS
    from megatron_visualchat.model.mmca.reference import mmca_attention_reference
    from megatron_visualchat.model.token_codes import codes_from_layout

    remote = sys.modules[get_class_from_dynamic_module(f"modeling_visualchat.{MODEL_CLASS}", TEMPLATE_DIR).__module__]
    modality, image_id, _ = (c[None] for c in codes_from_layout("tt000t11tt2pp"))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, modality.shape[1], 8, generator=g)
    for (mode, rows, combine), len_q in itertools.product(
            itertools.product(CORE_ATTENTION_MODES, IMAGE_ROWS, COMBINES), (modality.shape[1], 4)):
        q = torch.randn(1, 4, len_q, 8, generator=g)
        codes = remote.Codes(modality, image_id, mode, rows, combine)
        theirs = remote.mmca_attention(None, q, k, v, None, visualchat_codes=codes)[0].transpose(1, 2)
        ours = mmca_attention_reference(q, k, v, modality, image_id, image_rows=rows, combine=combine, mode=mode)
        assert torch.equal(theirs, ours), (mode, rows, combine, len_q, float((theirs - ours).abs().max()))
