"""Multi-round, multi-image conversation data: formats -> blend -> template/tokenize -> dataset -> collated batch.

Typical use::

    tok = VisualChatTokenizer.from_model_file("llama-2-7b/tokenizer.model")
    ds = build_train_dataset([{"format": "llava", "path": "llava/conversation_58k.json", "concat": 2,
                               "options": {"images": "coco/train2017"}}], tok,
                             num_image_tokens=257, max_seq_len=4096)
    loader = build_dataloader(ds, default_image_transform(224), batch_size=1, dp_rank=r, dp_size=n)
"""

import importlib

# name -> submodule. Resolved lazily (PEP 562) so that light entry points such as
# ``python -m megatron_visualchat.data.synthetic`` do not pay for importing torch.
_EXPORTS = {
    "BlendPlan": "blend", "DatasetSpec": "blend", "build_blend_plan": "blend",
    "VisualChatCollator": "collate",
    "Conversation": "conversation", "Round": "conversation", "image_ref": "conversation",
    "VisualChatDataset": "dataset", "build_train_dataset": "dataset",
    "IGNORE_INDEX": "encode", "ConversationEncoder": "encode", "EncodedConversation": "encode",
    "SKIP_REASONS": "errors", "SampleError": "errors",
    "READERS": "formats", "ConversationSource": "formats", "open_source": "formats",
    "decode_image": "images", "load_image": "images", "open_image_store": "images", "to_rgb": "images",
    "ResumableShardedSampler": "loader", "VisualChatDataLoader": "loader", "build_dataloader": "loader",
    "generate_synthetic_dataset": "synthetic", "synthetic_corpus_lines": "synthetic",
    "TEMPLATES": "templates", "Template": "templates", "get_template": "templates",
    "IMAGE_TOKEN": "tokenizer", "PAD_TOKEN": "tokenizer", "VisualChatTokenizer": "tokenizer",
    "train_tiny_sentencepiece": "tokenizer",
    "default_image_transform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
