"""Low-precision formats: DeepSeek-V3 block-wise FP8 (see fp8.py)."""

from nanoseek.quant.fp8 import (
    FP8Linear,
    FP8Recipe,
    convert_to_fp8,
    dequantize_activation_tilewise,
    dequantize_weight_blockwise,
    fp8_grouped_matmul,
    fp8_matmul,
    quantize_activation_tilewise,
    quantize_weight_blockwise,
)

__all__ = [
    "FP8Linear",
    "FP8Recipe",
    "convert_to_fp8",
    "dequantize_activation_tilewise",
    "dequantize_weight_blockwise",
    "fp8_grouped_matmul",
    "fp8_matmul",
    "quantize_activation_tilewise",
    "quantize_weight_blockwise",
]
