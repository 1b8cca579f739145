"""Small stand-ins for the example scripts' inputs: a tiny sentencepiece tokenizer, a LLaVA file of 16 two-image
records and a vision weights file (the dry run only checks that it exists)."""

import json

import pytest
from PIL import Image

from megatron_visualchat.data.tokenizer import train_tiny_sentencepiece


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    train_tiny_sentencepiece(str(root / "tok"), ["What colour is image 2?", "blue, on the left"] * 20, 300)
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (32, 32), colour).save(root / f"img{i}.png")
    record = {"image": ["img0.png", "img1.png"],
              "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat colour is image 2?"},
                                {"from": "gpt", "value": "blue"}]}
    (root / "llava.json").write_text(json.dumps([record] * 16))
    (root / "vision.safetensors").write_bytes(b"")
    return {"root": root, "tok": root / "tok", "data": root / "llava.json", "vision": root / "vision.safetensors"}
