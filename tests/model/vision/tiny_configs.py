"""Constants shared by the vision tests."""

# HF config matching ENCODERS["tiny"] (CLIP-shaped) and ENCODERS["tiny-siglip"].
TINY_VIT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)

# Projector options that fit the tiny encoder (4x4 patch grid + CLS); the abstractor slimmed (its real dims are
# tested separately on the meta device).
FITS_TINY = {"linear": {}, "mlp": {}, "pool_adapter": {"pool_out": 2}, "perceiver": {"num_queries": 4},
             "abstractor": {"width": 64, "num_heads": 4, "ffn_hidden": 96}}
