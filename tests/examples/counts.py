"""Parameter counts in closed form from the published model dimensions (LLaMA-2 configs, the Qwen-VL paper), written
out here independently of the code that builds the models."""

import math

# layers, hidden, attention heads, key/value heads, ffn hidden (HF LLaMA-2 config.json values)
LLAMA2 = {"llama2-7b": (32, 4096, 32, 32, 11008), "llama2-13b": (40, 5120, 40, 40, 13824),
          "llama2-70b": (80, 8192, 64, 8, 28672)}
# Meta's published totals (32000-token vocabulary, untied embeddings)
LLAMA2_PUBLISHED = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}


def padded_vocab(tp: int, vocab: int = 32000) -> int:
    """Megatron pads the vocabulary to a multiple of 128 x TP."""
    return math.ceil(vocab / (128 * tp)) * 128 * tp


def llama_stage(preset: str, tp: int, layers: int, first: bool, last: bool, vocab: int) -> int:
    """One TP rank of a pipeline stage with ``layers`` decoder layers; norms are whole on every TP rank."""
    _, h, heads, kv_heads, ffn = LLAMA2[preset]
    kv = kv_heads * (h // heads)
    sharded = layers * (h * h + 2 * h * kv + h * h + 3 * h * ffn)  # q, k, v, o; gate, up, down
    sharded += vocab * h * (first + last)  # input embeddings, output layer
    return sharded // tp + layers * 2 * h + (h if last else 0)  # + input/pre-MLP norms, final norm


def llama_total(preset: str, vocab: int = 32000) -> int:
    return llama_stage(preset, 1, LLAMA2[preset][0], True, True, vocab)


def qwen_vl_vit_bigg() -> int:
    """Qwen-VL's visual encoder without its final 4096x4096 proj: ViT-bigG/14 at 448 px (width 1664, 48 blocks,
    MLP 8192, no class token, bias-free patch conv, ln_pre) + the 256-query resampler (4096 wide) + ln_post."""
    w, depth, mlp, patches, out = 1664, 48, 8192, (448 // 14) ** 2, 4096
    trunk = 3 * 14 * 14 * w + patches * w + 2 * w
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * mlp + mlp) + (mlp * w + w)
    resampler = 256 * out + w * out + (3 * out * out + 3 * out) + (out * out + out) + 2 * 2 * out
    return trunk + depth * block + resampler + 2 * out


def linear_projector(vision: int, hidden: int) -> int:
    """DS-VisualChat's projector: Linear(vision -> hidden) + LayerNorm."""
    return vision * hidden + hidden + 2 * hidden
