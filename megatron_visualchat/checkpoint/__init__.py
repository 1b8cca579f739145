"""Every on-disk format, in one place (docs/design/checkpoints.md): HF weight files (``weight_files``), the
converted Megatron layout (``legacy_format``, ``convert``), trainable-only training checkpoints
(``training_state``) and chat checkpoints (``chat``). Nothing is imported here, so importing the package is free."""
