"""The optimizer of every training in annomine (the two-tower's and the tier-1 judge's): AdamW.

It runs PyTorch's fused kernel, one pass over all parameters per step, where the parameters' device has one
(CPU and CUDA): on 2 CPU cores that is ~19 ms a step for MiniLM's 22.7M parameters against ~100 ms for the
per-parameter loop. Hugging Face's Trainer, and so sentence-transformers' trainers, use the same kernel by default.
"""

from __future__ import annotations

FUSED_DEVICES = ("cpu", "cuda")


def adamw(param_groups: list[dict], **defaults):
    """`torch.optim.AdamW(param_groups, **defaults)`, fused where every parameter's device supports it."""
    import torch

    params = [p for group in param_groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(param_groups, fused=fused or None, **defaults)
