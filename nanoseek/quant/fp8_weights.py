"""FP8 inference weights: DeepSeek-V3's block-scaled FP8 checkpoint format (§3.3, see fp8.py) kept in memory.

A weight stays E4M3 with its float32 `scale_inv` per 128x128 block and is dequantized to the compute dtype
whenever its layer reads it, so a model holds ~1 byte per quantized parameter instead of 2 (bf16) or 4 (fp32).
The mechanism is a torch parametrization: `linear.weight` (or an `Experts` module's stacked `gate_proj`,
`up_proj`, `down_proj`) reads as `dequantize_weight_blockwise(w_fp8, scale_inv, dtype)` — the fp32 product, then
the cast, exactly what loading the checkpoint dequantized stores — so every path that reads a weight (nn.Linear's
forward, MLA's absorbed attention) computes on the dequantized model's very values. The routed experts dequantize
only the experts that received tokens (`dequantize_experts`). The decode fast paths (nanoseek.fastpath) run on
these modules too, without keeping dequantized copies (`holds_fp8`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nanoseek.quant.fp8 import dequantize_weight_blockwise


class DequantizeFP8(nn.Module):
    """The parametrization: the E4M3 tensor it is registered on [..., out, in] -> its value in `dtype`."""

    def __init__(self, scale_inv: Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale_inv", scale_inv)
        self.dtype = dtype

    def forward(self, w_fp8: Tensor) -> Tensor:
        return dequantize_weight_blockwise(w_fp8, self.scale_inv, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"scale_inv={tuple(self.scale_inv.shape)}, dtype={self.dtype}"


def store_fp8(module: nn.Module, name: str, w_fp8: Tensor, scale_inv: Tensor, dtype: torch.dtype) -> None:
    """Make `module.<name>` the FP8 weight `w_fp8` with its block scales, read as its dequantized value in `dtype`
    (frozen: FP8 weights are for inference)."""
    if name in module._parameters:
        delattr(module, name)  # (the placeholder it replaces, e.g. on the meta device)
    module.register_parameter(name, nn.Parameter(w_fp8, requires_grad=False))
    # unsafe: the parametrization changes the dtype, which torch's checks would refuse
    parametrize.register_parametrization(module, name, DequantizeFP8(scale_inv, dtype), unsafe=True)


def holds_fp8(module: nn.Module) -> bool:
    """Does `module` or one of its submodules hold FP8-stored weights?"""
    return any(isinstance(m, DequantizeFP8) for m in module.modules())


def dequantize_experts(module: nn.Module, name: str, index: Tensor | int) -> Tensor:
    """`module.<name>[index]` for a stacked FP8-stored weight [E, out, in], dequantizing those experts only, one
    at a time (the fp32 intermediates of a whole stack would take ~12 bytes per weight)."""
    stored = module.parametrizations[name]
    w, deq = stored.original, stored[0]

    def one(e: int) -> Tensor:
        return dequantize_weight_blockwise(w[e], deq.scale_inv[e], dtype=deq.dtype)
    if isinstance(index, int):
        return one(index)
    out = torch.empty((len(index), *w.shape[1:]), dtype=deq.dtype, device=w.device)
    for i, e in enumerate(index.tolist()):
        out[i] = one(e)
    return out
