"""CPU inference: the encoder's Linear layers as oneDNN matmuls with the bias (and the MLP's
activation) fused into the same kernel.

torch runs `nn.Linear` in fp32 on the CPU as an MKL GEMM, after a copy of the bias into the
output; the activation is a separate pass over the (tokens, intermediate) tensor. oneDNN's
inner product (`torch.ops.mkldnn._linear_pointwise`, which torch.compile's CPU backend emits, with
freezing, for a bf16 Linear and its activation) does all of it in one kernel. Measured on this
repo's 2-core CPU (AVX-512, torch 2.13, (4,096 x 384) inputs, fp32): the (384 -> 1,536) layer with
GELU 181 -> 206 GFLOP/s, the (1,536 -> 384) layer 200 -> 217; the classify model stage (small
RoBERTa, 1,000 rows, fresh processes, three runs each) 6,792-7,098 -> 7,312-7,788 tokens/s. The
README's performance section has the end-to-end figures. Other CPUs (AVX2 only, AMD, ARM) are
unmeasured.

The op is torch's private API (the leading underscore): `onednn_runs` checks that it exists and
runs at the model's dtype before anything is swapped, so another torch build falls back to
`nn.Linear` rather than failing.

The op has no backward (autograd would silently give wrong gradients), so a fused layer falls back
to `F.linear` and the activation whenever gradients are on: a fused model still trains correctly,
only inference (`torch.inference_mode()` / `torch.no_grad()`) takes the fast path. So does anything
the fusion was not checked for: a model moved to a GPU or cast to another dtype after fusing, or
inputs of another dtype (CPU autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.roberta import ACT_FNS, Block

# config.hidden_act -> oneDNN's post-op (attr, algorithm); an activation not listed stays a separate pass.
ONEDNN_ACTIVATIONS = {
    "gelu": ("gelu", "none"),  # erf, RoBERTa's and BERT's
    "gelu_new": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}
NO_ACTIVATION = ("none", "")


class FusedLinear(nn.Linear):
    """An `nn.Linear` sharing the given layer's parameters (same state_dict keys, ties kept) whose
    inference forward is one oneDNN kernel: matmul, bias and `activation` (a config.hidden_act name
    in ONEDNN_ACTIVATIONS, or None)."""

    def __init__(self, linear: nn.Linear, activation: str | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.fused_dtype = linear.weight.dtype  # the dtype `onednn_runs` checked
        self.activation = activation
        self.post_op = ONEDNN_ACTIVATIONS[activation] if activation else NO_ACTIVATION

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if torch.is_grad_enabled() or not (x.device.type == "cpu" and x.dtype == self.weight.dtype == self.fused_dtype):
            y = F.linear(x, self.weight, self.bias)
            return ACT_FNS[self.activation](y) if self.activation else y
        attr, algorithm = self.post_op
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's fused Linear at `dtype` (fp16 needs AVX-512
    FP16, which this repo's CPU lacks: its primitive cannot be created)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        with torch.inference_mode():
            ones = torch.ones(1, 1, dtype=dtype)
            torch.ops.mkldnn._linear_pointwise(ones, ones, ones[0], "gelu", [], "none")
    except RuntimeError:
        return False
    return True


def fuse_linear_layers(model: nn.Module) -> nn.Module:
    """In place, for CPU inference: every block's six Linear layers become `FusedLinear`s, the MLP's
    first one with the block's activation fused in (the block's `act` becomes the identity), where
    oneDNN runs the model's dtype. Anything else (a GPU model; fp16 on a CPU without AVX-512 FP16)
    is returned unchanged. Returns the model."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not onednn_runs(weight.dtype):
        return model
    activation = model.config.hidden_act if model.config.hidden_act in ONEDNN_ACTIVATIONS else None
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for attention in (a for a in (block.attention, block.crossattention) if a is not None):
            for name in ("query", "key", "value", "out"):
                setattr(attention, name, FusedLinear(getattr(attention, name)))
        block.mlp_up = FusedLinear(block.mlp_up, activation)
        if activation:
            block.act = nn.Identity()
        block.mlp_down = FusedLinear(block.mlp_down)
    return model
