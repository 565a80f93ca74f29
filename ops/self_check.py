"""Autograd of its own for the fast kernels' first-use self-checks (ops/state_scan.py, ops/gated_delta.py,
ops/ssd.py): a check runs when a kernel is first chosen, which may be inside a model's forward, under
no_grad (evaluation) or inside an activation checkpoint (train.recompute). Tensors its backward saves must
not go through the checkpoint's saved-tensor hooks: the checkpoint would count them as the layer's and
refuse the recomputation, whose forward no longer runs the (cached) check."""

from __future__ import annotations

import functools

import torch


def isolated_autograd(fn):
    """Run `fn` with grad enabled and saved tensors kept as they are (identity hooks: the innermost
    saved-tensor hooks win over an enclosing checkpoint's)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return fn(*args, **kwargs)
    return run
