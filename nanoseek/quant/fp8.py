"""Block-wise FP8 mixed precision — DeepSeek-V3 §3.3 (FP8 training) and the FP8 checkpoint format.

V3 quantizes every GEMM input to E4M3 with fine-grained scales: activations in 1x128 tiles
(per token, per 128 channels), weights in 128x128 blocks, scales computed online from each tile's
amax. Small groups keep an outlier from crushing the resolution of the whole tensor, which is what
lets E4M3 (more mantissa, less range than E5M2) be used for gradients too. Master weights, the
optimizer state, embeddings, lm_head, the MoE gate, norms and MTP's eh_proj stay high precision.

The released checkpoints store each quantized weight with ``weight_scale_inv`` of shape
[ceil(out/128), ceil(in/128)], and W = Wq · scale_inv[i // 128, j // 128] — the functions here
produce and consume exactly that layout.

CPU emulation: GEMM operands are quantized to E4M3 and dequantized (the quantization error exactly),
then multiplied with one of three accumulation models (`ACCUMULATIONS`; V3 §3.3.2):
  "v3"      (default) H800 tensor cores keep ~14 bits while they accumulate FP8 products; V3 promotes the
            partial sum to FP32 every N_C = 128 elements of K, applying the tile/block scales there.
            Emulated: each MMA adds its `MMA_K` products to the running in-block sum in fp32, which is then
            truncated to `ACC_MANTISSA_BITS`; the 128-wide blocks' sums are added in FP32.
  "limited" the same limited accumulator over the whole K, never promoted (FP8 GEMMs before V3's fix): its
            truncation error grows with K (V3 measured ~2% maximum relative error at K = 4096).
  "fp32"    exact FP32 accumulation: the ideal the promotion approaches, and the fastest to emulate.
Scales are constant over a 128-wide K block, so accumulating dequantized products equals accumulating raw
FP8 products and scaling at promotion (up to where the truncation falls relative to the scale).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
BLOCK = 128
ACCUMULATIONS = ("v3", "limited", "fp32")
MMA_K = 32  # K of one Hopper FP8 MMA instruction: its products are summed before the accumulator takes them
ACC_MANTISSA_BITS = 13  # the limited accumulator: 13 stored + 1 implicit = V3's "around 14 bits"


def _pair(block: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    bo, bi = (block, block) if isinstance(block, int) else tuple(block)
    if bo <= 0 or bi <= 0:
        raise ValueError(f"block={block!r} must be positive (an int or [rows, cols], e.g. 128 or [128, 128])")
    return bo, bi


def _scale_inv_from_amax(amax: Tensor) -> Tensor:
    # An all-zero block quantizes to zeros with any scale; 1.0 avoids 0/0 and keeps W = Wq·s exact.
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _to_fp8(x: Tensor) -> Tensor:
    # Clamp explicitly: amax/448 rounding can land a hair above 448, and only the CPU cast saturates.
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_blockwise(w: Tensor, block: int | tuple[int, int] = BLOCK) -> tuple[Tensor, Tensor]:
    """Quantize w [..., out, in] to E4M3 with one scale per block x block tile.

    Returns (w_fp8 [..., out, in], scale_inv float32 [..., ceil(out/block), ceil(in/block)]) where
    scale_inv = amax(|tile|) / 448. Ragged edge tiles are scaled over their real elements only.
    """
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dims [out, in], got shape {tuple(w.shape)}")
    bo, bi = _pair(block)
    *lead, rows, cols = w.shape
    nr, nc = math.ceil(rows / bo), math.ceil(cols / bi)
    wf = w.float()
    padded = F.pad(wf, (0, nc * bi - cols, 0, nr * bo - rows))  # zero padding never raises an amax
    tiles = padded.reshape(*lead, nr, bo, nc, bi)
    scale_inv = _scale_inv_from_amax(tiles.abs().amax(dim=(-3, -1)))
    q = _to_fp8(tiles / scale_inv[..., :, None, :, None])
    return q.reshape(*lead, nr * bo, nc * bi)[..., :rows, :cols].contiguous(), scale_inv


def dequantize_weight_blockwise(
    w_fp8: Tensor, scale_inv: Tensor, block: int | tuple[int, int] = BLOCK, dtype: torch.dtype = torch.float32
) -> Tensor:
    """W[i, j] = Wq[i, j] · scale_inv[i // block, j // block], computed in float32, returned as dtype.

    This is the official checkpoint format (DeepSeek-V3 ``weight_dequant``: fp32 product, then cast).
    """
    bo, bi = _pair(block)
    *lead, rows, cols = w_fp8.shape
    expected = (*lead, math.ceil(rows / bo), math.ceil(cols / bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(w_fp8.shape)} "
            f"with block ({bo}, {bi}); expected {expected}"
        )
    nr, nc = expected[-2:]
    w = F.pad(w_fp8.float(), (0, nc * bi - cols, 0, nr * bo - rows))  # whole blocks; the padding is cut after
    w = w.view(*lead, nr, bo, nc, bi) * scale_inv.float()[..., :, None, :, None]  # scales broadcast, not tiled
    return w.view(*lead, nr * bo, nc * bi)[..., :rows, :cols].to(dtype)


def quantize_activation_tilewise(x: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Quantize x [..., K] to E4M3 in 1 x block tiles along the last dim (V3: per token per 128 channels).

    Returns (x_fp8 [..., K], scale_inv float32 [..., ceil(K/block)]); x ≈ x_fp8 · scale_inv[..., k // block].
    """
    (b, _) = _pair(block)
    k = x.shape[-1]
    n = math.ceil(k / b)
    tiles = F.pad(x.float(), (0, n * b - k)).reshape(*x.shape[:-1], n, b)
    scale_inv = _scale_inv_from_amax(tiles.abs().amax(dim=-1))
    q = _to_fp8(tiles / scale_inv[..., None])
    return q.reshape(*x.shape[:-1], n * b)[..., :k].contiguous(), scale_inv


def dequantize_activation_tilewise(
    x_fp8: Tensor, scale_inv: Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of quantize_activation_tilewise: x[..., k] = x_fp8[..., k] · scale_inv[..., k // block]."""
    (b, _) = _pair(block)
    k = x_fp8.shape[-1]
    expected = (*x_fp8.shape[:-1], math.ceil(k / b))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match activation shape {tuple(x_fp8.shape)} "
            f"with block {b}; expected {expected}"
        )
    n = expected[-1]
    x = F.pad(x_fp8.float(), (0, n * b - k)).view(*x_fp8.shape[:-1], n, b) * scale_inv.float()[..., None]
    return x.view(*x_fp8.shape[:-1], n * b)[..., :k].to(dtype)


def fp8_matmul(
    x_fp8: Tensor,
    x_scale_inv: Tensor,
    w_fp8: Tensor,
    w_scale_inv: Tensor,
    block: int = BLOCK,
    out_dtype: torch.dtype = torch.float32,
    accumulation: str = "v3",
) -> Tensor:
    """y = x @ W^T for x quantized 1 x block along K and W [N, K] quantized block x block, with the
    `accumulation` model of the module docstring."""
    x = dequantize_activation_tilewise(x_fp8, x_scale_inv, block)
    w = dequantize_weight_blockwise(w_fp8, w_scale_inv, block)
    return _gemm(x, w.t(), accumulation, block).to(out_dtype)


def _gemm(a: Tensor, b: Tensor, accumulation: str = "v3", block: int = BLOCK) -> Tensor:
    """a [N, K] @ b [K, M] in fp32 under an accumulation model: "fp32" exact, "limited" a truncated
    accumulator over all of K, "v3" that accumulator over each `block` of K, promoted to FP32 between blocks."""
    if _check_accumulation(accumulation) == "fp32":
        return _matmul_fp32(a, b)
    with torch.autocast(device_type=a.device.type, enabled=False):
        (n, k), m = a.shape, b.shape[1]
        a, b = a.float(), b.float()
        span = k if accumulation == "limited" else block
        truncate = -(1 << (23 - ACC_MANTISSA_BITS))  # mask: the mantissa cut toward zero, as the aligner drops bits
        out = a.new_zeros(n, m)
        for start in range(0, k, span):
            acc = a.new_zeros(n, m)
            for c in range(start, min(start + span, k), MMA_K):
                acc.addmm_(a[:, c:c + MMA_K], b[c:c + MMA_K]).view(torch.int32).bitwise_and_(truncate)
            out += acc  # promotion: the block's partial sum joins the FP32 accumulator
        return out


def _check_accumulation(accumulation: str) -> str:
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation={accumulation!r} must be one of {ACCUMULATIONS}")
    return accumulation


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    # Under bf16 autocast a plain @ would round the dequantized operands to bf16 and break the
    # FP32-accumulation emulation.
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.float() @ b.float()


class _FP8LinearFn(torch.autograd.Function):
    """Fprop, Dgrad and Wgrad all on E4M3 inputs (V3 Figure 6), accumulated by the `accumulation` model.

    Every GEMM operand is scaled in groups that run along that GEMM's contraction dim, as the
    hardware needs to factor scales out of each K block:
      Fprop  y  = x  · Wᵀ  (K = in):     x in 1x128 tiles, W in 128x128 blocks;
      Dgrad  dx = dy · W   (K = out):    dy in 1x128 tiles, the same 128x128 W blocks (square, so
                                         they serve both orientations — why weights use blocks);
      Wgrad  dW = dyᵀ· x   (K = tokens): dy and x in 128x1 tiles.
    The forward caches x for Wgrad in FP8 (V3 §3.3.3), quantized 128x1 straight from the
    high-precision x, as Transformer Engine's block-scaling recipe does: re-tiling the 1x128 copy
    would quantize twice (measured: Wgrad cosine to fp32 drops from ~0.99935 to ~0.99902).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, block: int, accumulation: str) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_activation_tilewise(x2, block)
        wq, ws = quantize_weight_blockwise(weight, block)
        y = fp8_matmul(xq, xs, wq, ws, block, accumulation=accumulation)
        if bias is not None:
            y = y + bias.float()
        xtq, xts = quantize_activation_tilewise(x2.t(), block)  # [in, tokens]: 128x1 tiles of x
        ctx.save_for_backward(xtq, xts, wq, ws)
        ctx.block, ctx.accumulation, ctx.has_bias = block, accumulation, bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xtq, xts, wq, ws = ctx.saved_tensors
        block, acc = ctx.block, ctx.accumulation
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gq, gs = quantize_activation_tilewise(g, block)
            grad_x = fp8_matmul(gq, gs, wq.t(), ws.t(), block, accumulation=acc)
            grad_x = grad_x.to(ctx.x_dtype).reshape(*grad_out.shape[:-1], wq.shape[1])
        if ctx.needs_input_grad[1]:
            gtq, gts = quantize_activation_tilewise(g.t(), block)  # [out, tokens]: 128x1 tiles of dy
            xt = dequantize_activation_tilewise(xtq, xts, block)
            grad_w = _gemm(dequantize_activation_tilewise(gtq, gts, block), xt.t(), acc, block).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None, None


def _qdq_tiles(x: Tensor, block: int) -> Tensor:
    """x quantized to E4M3 in 1 x block tiles along its last dim, dequantized to fp32 (the emulated operand)."""
    return dequantize_activation_tilewise(*quantize_activation_tilewise(x, block), block)


class _FP8GroupedFn(torch.autograd.Function):
    """The routed experts' grouped GEMM, y_g = x_g · W_eᵀ for the rows of each expert e (sorted by expert,
    counts[e] of them), with the three GEMMs on E4M3 inputs scaled as `_FP8LinearFn` scales them: x and
    dy in 1x128 tiles along each GEMM's K, each expert's W [M, K] in 128x128 blocks, and for Wgrad
    dW_e = dy_eᵀ · x_e both operands in 128x1 tiles along the expert's own tokens (a tile never spans two
    experts). x is cached for Wgrad in FP8 (V3 §3.3.3). Emulated: dequantize, then the `accumulation` model."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: Tensor, block: int, accumulation: str) -> Tensor:
        sizes = counts.tolist()
        wq, ws = quantize_weight_blockwise(weight, block)  # [E, M, K]: blocks per expert
        w = dequantize_weight_blockwise(wq, ws, block)
        xs = _qdq_tiles(x, block).split(sizes)
        y = torch.cat([_gemm(xe, w[e].t(), accumulation, block) for e, xe in enumerate(xs)])
        ctx.xt = [quantize_activation_tilewise(xe.t(), block) for xe in x.split(sizes)]  # [K, n_e] in 128x1 tiles
        ctx.save_for_backward(wq, ws)
        ctx.block, ctx.accumulation, ctx.sizes, ctx.x_dtype, ctx.w_dtype = block, accumulation, sizes, x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        wq, ws = ctx.saved_tensors
        block, acc, sizes = ctx.block, ctx.accumulation, ctx.sizes
        w = dequantize_weight_blockwise(wq, ws, block)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gs = _qdq_tiles(grad_out, block).split(sizes)
            grad_x = torch.cat([_gemm(ge, w[e], acc, block) for e, ge in enumerate(gs)]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([
                _gemm(_qdq_tiles(ge.t(), block), dequantize_activation_tilewise(*ctx.xt[e], block).t(), acc, block)
                for e, ge in enumerate(grad_out.split(sizes))]).to(ctx.w_dtype)
        ctx.xt = None
        return grad_x, grad_w, None, None, None


def fp8_grouped_matmul(x: Tensor, weight: Tensor, counts: Tensor, block: int = BLOCK, accumulation: str = "v3") -> Tensor:
    """[N, K] rows sorted by expert × stacked expert weights [E, M, K] → [N, M], all three GEMMs in FP8."""
    if weight.shape[0] != counts.numel() or int(counts.sum()) != x.shape[0]:
        raise ValueError(f"counts ({counts.numel()} experts, {int(counts.sum())} rows) must match weight "
                         f"{tuple(weight.shape)} and x {tuple(x.shape)}")
    return _FP8GroupedFn.apply(x, weight, counts, _check_int_block(block), _check_accumulation(accumulation))


def _check_int_block(block: int) -> int:
    # One size for both: 1 x block activation tiles must line up with block x block weight blocks along K.
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block={block!r} must be a positive int for FP8 training (V3 uses 128)")
    return block


@dataclass(frozen=True)
class FP8Recipe:
    """How FP8 training runs a GEMM: the scaling block (1 x block activation tiles, block x block weight blocks)
    and the accumulation model (`ACCUMULATIONS`; "v3" promotes to FP32 every block of K)."""
    block: int = BLOCK
    accumulation: str = "v3"

    def __post_init__(self):
        _check_int_block(self.block)
        _check_accumulation(self.accumulation)


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run on block-scaled E4M3 inputs; parameters stay high precision.

    Same parameters and state_dict keys as nn.Linear, so it swaps in and out of checkpoints freely.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: FP8Recipe = FP8Recipe(),
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe = FP8Recipe()) -> "FP8Linear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (optimizers keep working)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.recipe = linear.in_features, linear.out_features, recipe
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.recipe.block, self.recipe.accumulation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3, block={self.recipe.block}, accumulation={self.recipe.accumulation}"


# Modules V3 keeps out of FP8 (matched against any dotted component of a module's name, or as a
# glob against the full name). "head" is MTP's shared_head.head; "gate" is the MoE router, not the
# gate_proj of an MLP.
DEFAULT_SKIP = ("lm_head", "gate", "eh_proj", "head")


def convert_to_fp8(model: nn.Module, skip: tuple[str, ...] | list[str] = DEFAULT_SKIP,
                   recipe: FP8Recipe = FP8Recipe()) -> nn.Module:
    """Replace every nn.Linear in model (in place) by an FP8Linear sharing its parameters, and switch every
    module with an `fp8` attribute (the MoE's stacked routed experts) to its FP8 grouped GEMMs.

    A module is left alone if its qualified name has a dotted component equal to an entry of skip
    or matches an entry as a glob (e.g. "model.layers.0.*"). Returns model.
    """
    def skipped(full: str) -> bool:
        return any(pat in full.split(".") or fnmatch.fnmatchcase(full, pat) for pat in skip)

    for name, module in model.named_modules():
        if hasattr(module, "fp8") and not skipped(name):
            module.fp8 = recipe
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or isinstance(child, FP8Linear):  # fastpath's FastLinear too
                continue
            if skipped(full):
                continue
            setattr(module, child_name, FP8Linear.from_linear(child, recipe))
    return model
