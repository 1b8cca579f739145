"""transformers' Chameleon VQ-VAE (Make-A-Scene's image tokenizer, 8192 codes) behind the ImageTokenizer interface.

transformers implements only the encoder and quantizer of this model (``ChameleonVQVAE.encode``), so these codes
can be *read* (images -> tokens for training data) but not drawn: ``decode`` refuses; the tiny VQ-VAE is the one
that draws. Weights come from a local directory: ``config.json`` (a ``ChameleonVQVAEConfig``, or a whole
``ChameleonConfig`` whose ``vq_config`` is used) and ``*.safetensors`` (bare VQ-VAE keys, or a full Chameleon
checkpoint's ``model.vqmodel.*``). Pixels are normalised as ``ChameleonImageProcessor`` does (x * 255 * 0.0078 - 1).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import torch
from safetensors import safe_open

from .base import ImageTokenizer

FULL_MODEL_PREFIX = "model.vqmodel."
RESCALE_FACTOR = 0.0078  # ChameleonImageProcessor's rescale_factor; image_mean = image_std = 1


class ChameleonImageTokenizer(ImageTokenizer):
    name = "chameleon"

    def __init__(self, model, fingerprint: str):
        cfg = model.config
        self.model = model.eval()
        downsample = 2 ** (len(cfg.channel_multiplier) - 1)
        self.image_size, self.codebook_size = cfg.resolution, cfg.num_embeddings
        self.num_codes = (cfg.resolution // downsample) ** 2
        self.fingerprint = fingerprint

    @torch.no_grad()
    def encode(self, images):
        self.check_images(images)
        pixels = images.to(self.model.dtype) * 255 * RESCALE_FACTOR - 1
        return self.model.encode(pixels).image_tokens.view(images.shape[0], -1)

    def decode(self, codes):
        raise NotImplementedError("chameleon: transformers implements only the encoder of Chameleon's VQ-VAE, so its "
                                  "codes cannot be drawn; use the tiny_vqvae tokenizer to generate images")

    @classmethod
    def load(cls, directory: str) -> "ChameleonImageTokenizer":
        config_path = os.path.join(directory, "config.json")
        shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not os.path.isfile(config_path) or not shards:
            raise ValueError(f"{directory}: need config.json and *.safetensors (Chameleon VQ-VAE weights; "
                             f"pickled .bin checkpoints are not read)")
        from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

        with open(config_path) as f:
            raw = json.load(f)
        raw = raw.get("vq_config", raw)
        raw.pop("model_type", None)
        config = ChameleonVQVAEConfig(**raw)
        model = ChameleonVQVAE(config)
        state = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(FULL_MODEL_PREFIX) or not key.startswith("model."):
                        state[key.removeprefix(FULL_MODEL_PREFIX)] = f.get_tensor(key)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: Chameleon VQ-VAE weights do not match the config: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode())
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].float().contiguous().numpy().tobytes())
        return cls(model, digest.hexdigest())
