"""HF LLaVA interop against transformers' LlavaForConditionalGeneration (tiny random model, no downloads): import as
a chat checkpoint (TP=1, TP=2) and as the training layout (TP=2 shards + vision dir + projector file), then our
model's logits on prompts with 0, 1 and 3 images equal transformers' where LLaVA expands each <image> token."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_visualchat.checkpoint.chat import CONFIG_FILE
from megatron_visualchat.checkpoint.errors import CheckpointError
from megatron_visualchat.checkpoint.hf_llava_export import main as export_main
from megatron_visualchat.checkpoint.weight_files import HFWeights
from megatron_visualchat.checkpoint.hf_llava import (
    PROJECTOR_FILE,
    TOKENIZER_OUT,
    VISION_DIR,
    import_chat,
    main,
    plan_import,
)
from megatron_visualchat.testing.distributed import run_parallel

IMAGE_TOKENS = 16  # tiny CLIP: 32 px / patch 8 = 4 x 4 patches, CLS dropped ("default" strategy)
# (text before, then per image: its text after) -> prompts with 0, 1 and 3 images
PROMPTS = ((5,), (3, 4), (2, 3, 1, 4))
GREEDY = 12  # new tokens compared with transformers' generate (greedy) on the 3-image prompt
RTOL = 5e-6  # measured: at most 7e-7 (fp32)


def _tiny_llava(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from megatron_visualchat.data import train_tiny_sentencepiece
    from megatron_visualchat.data.synthetic import synthetic_corpus_lines

    tok = train_tiny_sentencepiece(str(path / "tok"), synthetic_corpus_lines(num_samples=30), vocab_size=400)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=32)
    # The tiny preset's shape (GQA); the vocabulary padded past <image> and <pad> as LLaVA-1.5 pads it.
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=-(-(tok.vocab_size + 3) // 8) * 8,
                       max_position_embeddings=512, rms_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_id,
                         image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # norms away from 1 and larger weights, so a dropped or swapped tensor shows
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if p.ndim == 1 and "norm" in name else p.normal_(0.0, 0.1)
    out = path / "llava"
    model.save_pretrained(out)
    shutil.copy(path / "tok" / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return _tiny_llava(tmp_path_factory.mktemp("llava"))


def _prompt(shape, image_id: int, seed: int):
    """(input ids with each image expanded to IMAGE_TOKENS ids, modality, image index, pixels) of one prompt."""
    g = torch.Generator().manual_seed(seed)
    ids, modality, image = [1], [1], [-1]
    for i, n in enumerate(shape):
        if i:
            ids += [image_id] * IMAGE_TOKENS
            modality += [2] * IMAGE_TOKENS
            image += [i - 1] * IMAGE_TOKENS
        ids += torch.randint(3, image_id, (n,), generator=g).tolist()
        modality += [1] * n
        image += [-1] * n
    pixels = torch.randn(len(shape) - 1, 3, 32, 32, generator=g)
    return torch.tensor([ids]), torch.tensor([modality]), torch.tensor([image]), pixels


def _hf_logits(llava_dir: Path, image_id: int, greedy: bool = False):
    """transformers' logits on PROMPTS; with ``greedy`` also its greedy tokens after the last prompt (<image>,
    <pad> and the vocabulary padding suppressed, as our chat bans or never offers them)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seed, shape in enumerate(PROMPTS):
            ids, _, _, pixels = _prompt(shape, image_id, seed)
            out.append(model(input_ids=ids, pixel_values=pixels if len(pixels) else None).logits[0])
        if not greedy:
            return out
        suppress = [image_id, *range(image_id + 1, model.config.text_config.vocab_size)]
        tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=GREEDY, do_sample=False,
                                suppress_tokens=suppress)[0, ids.shape[1]:].tolist()
    return out, tokens


def _our_logits(model, image_id: int) -> list[torch.Tensor]:
    from megatron_visualchat.model.token_codes import pack_token_codes

    out = []
    with torch.no_grad():
        for seed, shape in enumerate(PROMPTS):
            ids, modality, image, pixels = _prompt(shape, image_id, seed)
            logits = model(ids, torch.arange(ids.shape[1])[None], pack_token_codes(modality, image),
                           pixel_values=pixels if len(pixels) else None, num_images=torch.tensor([len(pixels)]),
                           runtime_gather_output=True)
            out.append(logits[0].float())
    return out


def _chat_logits(chat_dir: str, image_id: int):
    """Our logits on PROMPTS and our chat's greedy tokens after the last one (KV-cache decoding)."""
    from megatron_visualchat.inference.checkpoint import build_chat_model
    from megatron_visualchat.inference.generation import generate
    from megatron_visualchat.inference.kv_cache import KVCache
    from megatron_visualchat.inference.prompt import Chunk
    from megatron_visualchat.inference.sampling import SamplingParams

    model, tok, _ = build_chat_model(chat_dir)
    ids, modality, image, pixels = _prompt(PROMPTS[-1], image_id, len(PROMPTS) - 1)
    gen = generate(model, KVCache(1, 128), Chunk(ids, modality, image, pixels, torch.tensor([len(pixels)])),
                   SamplingParams(max_new_tokens=GREEDY), eos_id=tok.eos_id, vocab_size=tok.vocab_size,
                   pad_id=tok.pad_id, banned_ids=(tok.image_id, tok.pad_id))
    return _our_logits(model, image_id), gen.tokens[0]


def _training_logits(out: str, image_id: int):
    from megatron_visualchat.checkpoint.hf_llava import plan_import
    from megatron_visualchat.checkpoint.legacy_format import load_megatron_checkpoint
    from megatron_visualchat.model.visualchat import VisualChatModel
    from megatron_visualchat.testing.equivalence import current_parallel

    plan = plan_import(Path(out).parent / "llava")
    vision = dataclasses.replace(plan.vision, encoder_weights=f"{out}/{VISION_DIR}",
                                 projector_weights=f"{out}/{PROJECTOR_FILE}")
    cfg = plan.config.replace(vision=vision, parallel=current_parallel())
    model = VisualChatModel(cfg).eval()
    load_megatron_checkpoint(model.language_model, out)
    return _our_logits(model, image_id)


def _assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs):
        a = a[:, :b.shape[-1]]
        assert torch.isfinite(a).all()
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= RTOL, err


def test_import_gives_transformers_logits(llava, tmp_path):
    plan = plan_import(llava)
    assert plan.vision.encoder == "tiny" and plan.vision.projector == "mlp"
    assert plan.vision.encoder_options == {"feature_layer": -2, "drop_cls": True}
    assert plan.llm.vocab_size > plan.tokenizer.vocab_size  # the padded LLaVA vocabulary is kept
    theirs, their_tokens = _hf_logits(llava, plan.tokenizer.image_id, greedy=True)

    chat = import_chat(plan, tmp_path / "chat", dtype="fp32")
    ours = {}
    for tp in (1, 2):
        ours[tp], tokens = run_parallel(_chat_logits, tp=tp, args=(str(chat), plan.tokenizer.image_id))[0]
        _assert_close(ours[tp], theirs)
        assert tokens == their_tokens

    # export back: the same tensors bit for bit, and transformers' logits on the export equal ours
    assert export_main(["--load", str(chat), "--out", str(tmp_path / "hf"), "--max-shard-size", "100KB"]) == 0
    original, exported = HFWeights(llava), HFWeights(tmp_path / "hf")
    assert len(set(exported.weight_map.values())) > 1 and set(exported) == set(original)
    differ = sorted(n for n in original if not torch.equal(original[n], exported[n]))
    assert differ == ["vision_tower.post_layernorm.bias", "vision_tower.post_layernorm.weight"]  # unused by LLaVA
    _assert_close(ours[1], _hf_logits(tmp_path / "hf", plan.tokenizer.image_id))
    # its processor: <image> expanded to the tower's tokens, our pixels
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_visualchat.model.vision import ENCODERS

    image = Image.fromarray(torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8).numpy())
    processed = AutoProcessor.from_pretrained(tmp_path / "hf")(images=[image], text="<image>\nhi",
                                                               return_tensors="pt")
    assert int((processed["input_ids"] == plan.tokenizer.image_id).sum()) == IMAGE_TOKENS
    assert float((processed["pixel_values"][0] - ENCODERS["tiny"].preprocess.transform()(image)).abs().max()) <= 1e-6

    train = llava.parent / "train-tp2"
    assert main(["--hf-dir", str(llava), "--out", str(train), "--tp", "2", "--dtype", "fp32"]) == 0
    assert (train / "iter_0000000" / "mp_rank_01" / "model_optim_rng.pt").is_file()
    assert (train / TOKENIZER_OUT / "added_tokens.json").is_file()
    _assert_close(run_parallel(_training_logits, tp=2, args=(str(train), plan.tokenizer.image_id))[0], theirs)


def test_refusals_name_the_key(llava, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(llava, bad)
    config = json.loads((bad / "config.json").read_text())
    for key, value, match in (("vision_feature_layer", [-2, -1], "concatenated layers"),
                              ("projector_hidden_act", "relu", "projector_hidden_act='relu'"),
                              ("image_seq_length", 17, "image_seq_length=17"),
                              ("image_token_index", 5, "image_token_index=5")):
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=match):
            plan_import(bad)
    (bad / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "full"}))
    with pytest.raises(CheckpointError, match="image_seq_length=16"):  # "full" keeps CLS: 17 tokens
        plan_import(bad)
    (bad / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "full",
                                                 "image_seq_length": 17}))
    assert plan_import(bad).vision.encoder_options == {"feature_layer": -2, "drop_cls": False}
    assert main(["--hf-dir", str(bad), "--out", str(tmp_path / "o"), "--chat", "--tp", "2"]) == 2
    assert not (tmp_path / "o").exists()


def test_export_refuses_what_llava_cannot_compute(llava, tmp_path, capsys):
    chat = import_chat(plan_import(llava), tmp_path / "chat", dtype="fp32")
    config = json.loads((chat / CONFIG_FILE).read_text())
    config["attention"].update(mode="mmca", modality_split="kv")
    config["vision"]["projector"] = "perceiver"  # the trust_remote_code model has no perceiver either
    (chat / CONFIG_FILE).write_text(json.dumps(config))
    assert export_main(["--load", str(chat), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    for reason in ("attention.mode='mmca'", "trust_remote_code", "modality_split='kv'", "projector='perceiver'"):
        assert reason in err
    assert not (tmp_path / "hf").exists()
