"""Layout planner: which (TP, PP, VPP, DP, recompute, pipeline split) fit a VisualChat job in GPU memory, from
closed-form parameter counts and a per-GPU memory model (docs/planner.md). `megatron-visualchat plan`."""
