"""megatron_visualchat: multi-image, multi-round visual chat (MMCA) on megatron-core."""

__version__ = "0.1.0"
