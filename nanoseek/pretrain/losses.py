"""Language-modelling losses: next-token cross-entropy and the MTP losses (DeepSeek-V3 §2.2).

A training window from `nanoseek.data.PackedLoader` holds S + 1 + D tokens t_0 .. t_{S+D} for MTP
depth D. The model is fed the first S + D of them, so that every depth still has S positions:

    main head at position i (0 ≤ i < S) predicts t_{i+1}                -> targets window[:, 1 : S+1]
    MTP depth k at position i (0 ≤ i < S) predicts t_{i+k+1}             -> targets window[:, k+1 : k+1+S]

Depth k's logits cover the S + D − k ≥ S positions whose input token t_{i+k} was fed; only the first
S are scored. The main model's extra D positions change nothing before them (causal attention) and
their logits are ignored, so the main loss is exactly that of an S-token window, and every depth
scores S positions instead of S − k (feeding only S tokens would lose the last k targets of each
depth). The cost is D extra positions per window (0.4% at S = 256, D = 1).

L = L_main + λ/D · Σ_k L_k (V3 Eq. 25), plus the model's weighted balance losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def model_inputs(window_BT: torch.Tensor, seq_len: int, mtp_depth: int) -> torch.Tensor:
    """The S + D tokens fed to the model from a window of S + 1 + D."""
    return window_BT[:, : seq_len + mtp_depth]


def document_mask(ids_BS: torch.Tensor, *, bos_id: int | None = None, eos_id: int | None = None) -> torch.Tensor:
    """[B, 1, S, S] attention mask (True = attend) that keeps each query inside its own document: causal, and
    cut before every `bos_id` (documents that start with BOS: rendered chats, whose turns each end in EOS)
    or else after every `eos_id` (plain text, one EOS after each document). A window's tokens before its
    first cut are the tail of one document."""
    if bos_id is not None:
        starts_BS = ids_BS == bos_id
    else:
        starts_BS = torch.zeros_like(ids_BS, dtype=torch.bool)
        starts_BS[:, 1:] = ids_BS[:, :-1] == eos_id
    doc_BS = torch.cumsum(starts_BS, dim=1)
    S = ids_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=ids_BS.device).tril()
    return ((doc_BS[:, :, None] == doc_BS[:, None, :]) & causal_SS)[:, None]


def lm_losses(out, window_BT: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main cross-entropy, [cross-entropy of MTP depth k for k = 1..D]), each a mean over B·S targets (fp32)."""
    S = seq_len
    main = F.cross_entropy(out.logits[:, :S].flatten(0, 1).float(), window_BT[:, 1:S + 1].flatten())
    mtp = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        targets = window_BT[:, k + 1:k + 1 + S]
        if logits.shape[1] < S or targets.shape[1] < S:
            raise ValueError(f"MTP depth {k} needs {S} positions and targets: feed seq_len + depth tokens from "
                             f"windows of seq_len + 1 + depth (got logits for {logits.shape[1]} positions, "
                             f"{targets.shape[1]} targets)")
        mtp.append(F.cross_entropy(logits[:, :S].flatten(0, 1).float(), targets.flatten()))
    return main, mtp


def total_loss(main: torch.Tensor, mtp: list[torch.Tensor], mtp_weight: float,
               aux_loss: torch.Tensor | None) -> torch.Tensor:
    """L_main + λ/D Σ_k L_k + balance losses."""
    loss = main
    if mtp and mtp_weight:
        loss = loss + mtp_weight / len(mtp) * torch.stack(mtp).sum()
    if aux_loss is not None:
        loss = loss + aux_loss
    return loss
