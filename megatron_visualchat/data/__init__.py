"""Multi-round, multi-image conversation data: formats -> blend -> template/tokenize -> dataset -> collated batch.

Typical use::

    tok = VisualChatTokenizer.from_model_file("llama-2-7b/tokenizer.model")
    ds = build_train_dataset([{"format": "llava", "path": "llava/conversation_58k.json", "concat": 2,
                               "options": {"images": "coco/train2017"}}], tok,
                             num_image_tokens=257, max_seq_len=4096)
    transform = ENCODERS["clip-vit-l-14-224"].preprocess.transform()  # the encoder's pixels (model/vision)
    loader = build_dataloader(ds, transform, batch_size=1, dp_rank=r, dp_size=n)

The synthetic data sets (``data/synthetic.py``, ``data/synthetic_grounding.py``) are not re-exported here: they run
as ``python -m``, and a module its package imports first would be imported twice. Grounding (boxes as text) lives
in ``data/boxes.py`` (docs/grounding.md).
"""

from megatron_visualchat.data.blend import BlendPlan, DatasetSpec, build_blend_plan
from megatron_visualchat.data.collate import VisualChatCollator
from megatron_visualchat.data.conversation import Conversation, Round, image_ref
from megatron_visualchat.data.dataset import VisualChatDataset, build_train_dataset
from megatron_visualchat.data.encode import IGNORE_INDEX, ConversationEncoder, EncodedConversation
from megatron_visualchat.data.errors import SKIP_REASONS, SampleError
from megatron_visualchat.data.formats import READERS, ConversationSource, open_source
from megatron_visualchat.data.images import decode_image, load_image, open_image_store, to_rgb
from megatron_visualchat.data.loader import ResumableShardedSampler, VisualChatDataLoader, build_dataloader
from megatron_visualchat.data.templates import TEMPLATES, Template, get_template
from megatron_visualchat.data.tokenizer import IMAGE_TOKEN, PAD_TOKEN, VisualChatTokenizer, train_tiny_sentencepiece

__all__ = [
    "IGNORE_INDEX", "IMAGE_TOKEN", "PAD_TOKEN", "READERS", "SKIP_REASONS", "TEMPLATES", "BlendPlan", "Conversation",
    "ConversationEncoder", "ConversationSource", "DatasetSpec", "EncodedConversation", "ResumableShardedSampler",
    "Round", "SampleError", "Template", "VisualChatCollator", "VisualChatDataLoader", "VisualChatDataset",
    "VisualChatTokenizer", "build_blend_plan", "build_dataloader", "build_train_dataset", "decode_image",
    "get_template", "image_ref", "load_image", "open_image_store", "open_source", "to_rgb", "train_tiny_sentencepiece",
]
