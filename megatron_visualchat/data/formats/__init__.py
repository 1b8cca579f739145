"""Registry of annotation formats: name -> reader class (each a lazily parsed ConversationSource)."""

from __future__ import annotations

from .base import ConversationSource
from .grounding import GroundedChatSource, RefExpSource
from .images_out import ImageOutputJsonlSource
from .llava import LlavaSource
from .llava_otter import LlavaOtterBlendSource
from .mimicit import MimicItSource
from .rounds_jsonl import RoundsJsonlSource
from .sparkles import SparklesSource

READERS: dict[str, type[ConversationSource]] = {
    "llava": LlavaSource,
    "mimicit": MimicItSource,
    "sparkles": SparklesSource,
    "jsonl": RoundsJsonlSource,
    "llava_otter": LlavaOtterBlendSource,
    "refexp": RefExpSource,
    "grounded_chat": GroundedChatSource,
    "jsonl_images_out": ImageOutputJsonlSource,  # answers that write images as codes (needs an image tokenizer)
}


def open_source(fmt: str, path: str, **options) -> ConversationSource:
    """Open ``path`` with the reader registered as ``fmt``; reader options are keyword arguments."""
    if fmt not in READERS:
        raise ValueError(f"format={fmt!r} is not one of {sorted(READERS)}")
    try:
        return READERS[fmt](path, **options)
    except TypeError as e:
        raise ValueError(f"format={fmt!r} ({path}): bad options {sorted(options)}: {e}") from None


__all__ = ["READERS", "ConversationSource", "open_source"]
