"""Image tokenizers: the registry, Chameleon's VQ-VAE against transformers, the tiny VQ-VAE learning."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_visualchat.model.image_tokenizer import IMAGE_TOKENIZERS, load_image_tokenizer
from megatron_visualchat.model.image_tokenizer.tiny_vqvae import TinyVQVAE, TinyVQVAEConfig, TinyVQVAETokenizer
from megatron_visualchat.model.image_tokenizer.train import evaluate, synthetic_images, train_tiny_vqvae


def test_registry_names_and_errors(tmp_path):
    assert set(IMAGE_TOKENIZERS) == {"tiny_vqvae", "chameleon"}
    with pytest.raises(ValueError, match="not one of"):
        load_image_tokenizer("dalle", str(tmp_path))
    with pytest.raises(ValueError, match="train-image-tokenizer"):
        load_image_tokenizer("tiny_vqvae", str(tmp_path))
    with pytest.raises(ValueError, match="safetensors"):
        load_image_tokenizer("chameleon", str(tmp_path))


def _tiny_chameleon(tmp_path, full_checkpoint: bool):
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=16, base_channels=32,
                                  channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    ref = ChameleonVQVAE(config).eval()
    with torch.no_grad():  # codebook from encoder outputs, so codes differ between positions
        z = ref.quant_conv(ref.encoder(torch.rand(2, 3, 16, 16) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
        ref.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:32]])
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    raw = config.to_dict()
    if full_checkpoint:  # a whole Chameleon checkpoint: vq_config inside, weights under model.vqmodel.
        state = {f"model.vqmodel.{k}": v for k, v in state.items()} | {"model.embed_tokens.weight": torch.zeros(4, 2)}
        raw = {"model_type": "chameleon", "vq_config": raw}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return ref


@pytest.mark.parametrize("full_checkpoint", [False, True])
def test_chameleon_codes_equal_transformers(tmp_path, full_checkpoint):
    ref = _tiny_chameleon(tmp_path, full_checkpoint)
    tok = load_image_tokenizer("chameleon", str(tmp_path))
    assert (tok.image_size, tok.codebook_size, tok.num_codes) == (16, 32, 64)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    codes = tok.encode(images)
    with torch.no_grad():
        expected = ref.encode(images * 255 * 0.0078 - 1).image_tokens.view(2, -1)
    assert codes.shape == (2, 64) and codes.unique().numel() > 4
    torch.testing.assert_close(codes, expected, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="only the encoder"):
        tok.decode(codes)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        tok.encode(torch.rand(1, 3, 32, 32))


def test_tiny_vqvae_learns_and_round_trips(tmp_path):
    cfg = TinyVQVAEConfig(image_size=16, codebook_size=32, embed_dim=8, channels=8)
    held_out = synthetic_images(32, 16, "test:heldout")
    torch.manual_seed(0)
    untrained = evaluate(TinyVQVAETokenizer(TinyVQVAE(cfg), "untrained"), held_out)
    model, losses = train_tiny_vqvae(cfg, steps=60, batch_size=16, lr=5e-3, pool_size=256)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])  # measured 0.45
    TinyVQVAETokenizer.save(model, str(tmp_path))
    tok = load_image_tokenizer("tiny_vqvae", str(tmp_path))
    trained = evaluate(tok, held_out)
    assert trained["mse"] < 0.3 * untrained["mse"]  # measured 0.22 (0.040 vs 0.184)
    codes = tok.encode(held_out[:3])
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert tok.decode(codes).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        tok.decode(torch.full((1, 16), 32))
    # the fingerprint names the weights: retraining changes it, so cached codes are not reused
    TinyVQVAETokenizer.save(TinyVQVAE(cfg), str(tmp_path / "other"))
    assert load_image_tokenizer("tiny_vqvae", str(tmp_path / "other")).fingerprint != tok.fingerprint


def test_train_image_tokenizer_command(tmp_path, capsys):
    from megatron_visualchat.cli import main as console

    out = str(tmp_path / "vq")
    assert console(["train-image-tokenizer", "--out", out, "--steps", "2", "--image-size", "16", "--codebook-size",
                    "8", "--batch-size", "4", "--num-eval", "4"]) == 0
    report = capsys.readouterr().out
    assert "held-out (4 images): mse" in report and "dominant colour kept" in report
    tok = load_image_tokenizer("tiny_vqvae", out)
    assert (tok.image_size, tok.codebook_size, tok.num_codes) == (16, 8, 16)
    with pytest.raises(SystemExit):
        console(["train-image-tokenizer", "--out", out, "--image-size", "18"])
    assert "multiple of 4" in capsys.readouterr().err
