"""bf16 matmuls on CPUs without bf16 GEMM hardware, and the model's Linear layer.

Under bf16 autocast a matmul rounds its operands to bf16, multiplies them accumulating in fp32, and
rounds the result to bf16. torch's CPU bf16 GEMM is fast only where oneDNN has bf16 kernels (x86 with
AVX-512 BW/VL/DQ, AMX, or Arm with bf16); elsewhere (e.g. AVX2-only laptops and servers) it takes a
generic kernel 10-50x slower than fp32 GEMM. There nanoseek computes the same thing with fp32 kernels:
the product of two bf16 numbers is exact in fp32 and the accumulation is fp32 either way, so rounding
the operands to bf16, calling the fp32 kernel and rounding the result matches a bf16 GEMM up to the
order of summation (gradients go through the same roundings, so they match too). This is what
`linear` (and the `Linear` layer), the routed experts' grouped matmul (`nanoseek.model.moe`) and MLA's
training attention (fp32 flash kernel on the bf16 values, `nanoseek.model.attention`) do under CPU
bf16 autocast.
"""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_bf16_gemm_is_slow() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # Arm and others: leave torch's kernels alone
    caps = torch.cpu.get_capabilities()
    # torch routes bf16 GEMM to oneDNN when mkldnn_bf16_device_check() holds: AVX-512 BW + VL + DQ
    return not (caps.get("avx512_bw") and caps.get("avx512_vl") and caps.get("avx512_dq"))


CPU_BF16_GEMM_IS_SLOW = _cpu_bf16_gemm_is_slow()


def emulate_bf16(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when a `dtype` matmul on x's device should run as fp32 kernels on bf16-rounded operands."""
    return dtype == torch.bfloat16 and CPU_BF16_GEMM_IS_SLOW and x.device.type == "cpu"


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 (nearest even), held in fp32 for the fp32 kernels."""
    return t.to(torch.bfloat16).float()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call when t already has it (even a no-op cast is a dispatched op, and a
    decoded token's step is bound by the number of ops)."""
    return t if t.dtype == dtype else t.to(dtype)


def scalar(value: float) -> torch.Tensor:
    """value as a 0-dim fp32 CPU tensor, to combine with tensors of any device and floating dtype in place
    of a Python number: torch wraps a Python number into a tensor on every call, ~4 µs per op on CPU."""
    return torch.tensor(value, dtype=torch.float32, device="cpu")  # (explicit device: models are built on meta too)


def decode_layout(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] (same shape and values) laid out for `linear` over a few rows: column-major on CPU,
    where MKL multiplies one to eight rows by it 1.1-2.5x faster than by a row-major weight."""
    return w.t().contiguous().t() if w.device.type == "cpu" else w


class DecodeCache:
    """Weight copies a module keeps for decoding, rebuilt when `key` (the source weights' pointers and
    versions) changes. Not part of the module's state: a deep copy or a pickle starts empty."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = key, build()
        return self.value

    def clear(self) -> None:
        self.key = self.value = None

    def __deepcopy__(self, memo) -> "DecodeCache":
        return DecodeCache()

    def __reduce__(self):
        return DecodeCache, ()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with bf16-autocast GEMMs run as fp32 kernels on bf16-rounded operands on CPUs without
    bf16 GEMM hardware (module docstring)."""
    if CPU_BF16_GEMM_IS_SLOW and torch.is_autocast_enabled("cpu") and x.device.type == "cpu" \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            bias = None if bias is None else round_bf16(bias)
            return F.linear(round_bf16(x), round_bf16(weight), bias).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
