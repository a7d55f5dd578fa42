"""The DeepSeekMoE experiments: the architecture (`moe`), load balancing (`balance`) and device-limited
routing (`routing`), each on micro MoE models pretrained on the same tokens (`micro`)."""
from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.experiments import micro
from nanoseek.experiments.core import Check, Context, Metric, Variant
from nanoseek.experiments.micro import BPB, TRAIN_LOSS, MicroPretraining
from nanoseek.interop.hf import load_pretrained


# ---------------------------------------------------------------------------- moe
def _ffn(n_routed: int, width: int, k: int, shared: int) -> dict:
    """Every layer MoE with softmax gates and the expert-level balance loss (DeepSeekMoE's setting)."""
    return dict(n_routed_experts=n_routed, moe_intermediate_size=width, num_experts_per_tok=k,
                n_shared_experts=shared, first_k_dense_replace=0, scoring_func="softmax", topk_method="greedy",
                n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, seq_aux_alpha=0.0,
                expert_aux_alpha=0.01, num_nextn_predict_layers=0)


NO_BIAS = ["balance.bias_update_speed=0"]


class MoEExperiment(MicroPretraining):
    name = "moe"
    title = "DeepSeekMoE vs GShard vs dense"
    claim = ("Fine-grained expert segmentation plus shared-expert isolation beats GShard-style top-2 MoE at the same "
             "total and activated parameters, and both beat the dense model with the same activated parameters")
    paper = ("DeepSeekMoE Table 1 (2B, 100B tokens, Pile loss): dense 2.060, GShard 1.867, DeepSeekMoE 1.808")
    metrics = (BPB, TRAIN_LOSS)
    matched_on = {"active params": None, "params": ("DeepSeekMoE", "GShard"), "tokens": None}
    # GShard: 8 experts of width 128, top-2. DeepSeekMoE: each split in 4 (m = 4), one of the 32 isolated as
    # shared, top-7 of the other 31: the same 2 × 128 activated and 8 × 128 total expert width.
    models = {
        "DeepSeekMoE": (_ffn(31, 32, 7, 1), NO_BIAS),
        "GShard": (_ffn(8, 128, 2, 0), NO_BIAS),
        "Dense": (dict(n_routed_experts=0, intermediate_size=264, first_k_dense_replace=0, seq_aux_alpha=0.0,
                       num_nextn_predict_layers=0), NO_BIAS),
    }
    checks = (Check("val_bpb", "DeepSeekMoE", "less", "GShard"), Check("val_bpb", "GShard", "less", "Dense"))
    notes = ("tiny-v3 backbone (MLA, hidden 64, 3 layers), every layer's FFN replaced: GShard 8 × 128 top-2, "
             "DeepSeekMoE 1 shared + 31 routed × 32 top-7, dense SwiGLU 264 (256 + the routers' share of activated parameters); softmax gates, expert balance loss "
             "α1 = 0.01 (DeepSeekMoE 2B); fp32; full plan 400 steps × 16 × 128 tokens (0.8M) of stdlib Python. "
             "DeepSeekMoE trained 2B models on 100B tokens; at 0.8M tokens the finer router has less data per "
             "expert to learn from, which works against it.")


# ---------------------------------------------------------------------------- balance
_BALANCE_MODEL = dict(n_routed_experts=16, moe_intermediate_size=32, num_experts_per_tok=4, n_group=1, topk_group=1,
                      num_nextn_predict_layers=0, seq_aux_alpha=0.0)


class BalanceExperiment(MicroPretraining):
    name = "balance"
    title = "Auxiliary-loss-free balancing vs the auxiliary loss"
    claim = ("Steering top-K selection with per-expert biases balances the load far better than an auxiliary "
             "loss, at an equal or lower language-model loss")
    paper = ("Aux-loss-free balancing (2408.15664) Table 2, 1B: MaxVio_global 0.72 (aux loss) vs 0.04 (loss-free), "
             "perplexity 9.56 vs 9.50; V3 Table 5 small MoE BPB 0.727 → 0.724")
    metrics = (BPB, Metric("max_vio_global", "MaxVio_global (held-out)", fmt=".3f"),
               Metric("max_vio_batch", "MaxVio_batch (last 10%)", fmt=".3f"), TRAIN_LOSS)
    matched_on = {"params": None, "tokens": None}
    matched_keys = ("params", "tokens")
    models = {
        "none": (_BALANCE_MODEL, NO_BIAS),
        "aux loss": ({**_BALANCE_MODEL, "expert_aux_alpha": 0.01}, NO_BIAS),
        "aux-free": (_BALANCE_MODEL, ["balance.bias_update_speed=0.01"]),
        "aux-free + seq loss": ({**_BALANCE_MODEL, "seq_aux_alpha": 1e-4}, ["balance.bias_update_speed=0.01"]),
    }
    checks = (Check("max_vio_global", "aux-free", "less", "aux loss"),
              Check("val_bpb", "aux-free", "not_worse", "aux loss", tol=0.0),
              Check("max_vio_global", "aux-free", "less", "none"))
    notes = ("tiny-v3 backbone (MLA, hidden 64, 3 layers, first dense), 16 routed experts × 32 top-4 + 1 shared, "
             "sigmoid gates (V3); aux loss = expert-level α1 = 0.01; aux-free bias speed γ = 0.01 (V3 uses 0.001 "
             "over ~10^5 steps; 400 steps need larger moves); the sequence-wise loss α = 1e-4 as V3; fp32; full plan "
             "400 steps × 16 × 128 tokens of stdlib Python.")


# ---------------------------------------------------------------------------- routing
EP, ROUTED, TOPK = 8, 64, 6
_ROUTING_MODEL = dict(n_routed_experts=ROUTED, moe_intermediate_size=16, num_experts_per_tok=TOPK, n_shared_experts=1,
                      ep_size=EP, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                      norm_topk_prob=False, routed_scaling_factor=1.0, seq_aux_alpha=0.0, expert_aux_alpha=0.003,
                      num_nextn_predict_layers=0)


def devices_per_token(model, input_ids: torch.Tensor) -> float:
    """Mean number of distinct devices (of ep_size, contiguous expert blocks) a token's routed experts live on,
    over MoE layers: the hidden-state rows dispatched per token when each device gets a token once."""
    per_device = model.config.n_routed_experts // model.config.ep_size
    counts = []
    hooks = [m.gate.register_forward_hook(lambda _m, _i, r: counts.append(
        torch.zeros(r.indices.shape[0], model.config.ep_size).scatter_(1, r.indices // per_device, 1.0).sum(1).mean()))
        for m in model.moe_layers()]
    try:
        with torch.no_grad():
            model(input_ids, mtp=False)
    finally:
        for h in hooks:
            h.remove()
    return float(torch.stack(counts).mean())


class RoutingExperiment(MicroPretraining):
    name = "routing"
    title = "Device-limited routing: M devices per token vs unrestricted"
    claim = ("Limiting each token's experts to its top-M devices (M ≥ 3) performs about as well as unrestricted "
             "top-K routing while bounding each token's dispatch to M devices")
    paper = "DeepSeek-V2 §2.2.2: M = 3 of D = 8 devices (6 of 160 experts) 'performs on par with unrestricted top-K'"
    metrics = (BPB, Metric("devices_per_token", "devices per token (dispatch rows)", fmt=".2f"), TRAIN_LOSS)
    matched_on = {"params": None, "active params": None, "tokens": None}
    models = {**{f"M={m}": ({**_ROUTING_MODEL, "topk_devices": m}, NO_BIAS) for m in (1, 2, 3, 4)},
              "unrestricted": (_ROUTING_MODEL, NO_BIAS)}
    checks = (Check("val_bpb", "M=3", "not_worse", "unrestricted", tol=0.005),
              Check("devices_per_token", "M=3", "less", "unrestricted"))
    notes = (f"tiny-v3 backbone (MLA, hidden 64, 3 layers, first dense), {ROUTED} routed experts × 16 top-{TOPK} + 1 "
             f"shared on ep_size = {EP} simulated devices ({ROUTED // EP} experts each), softmax gates, V2's expert "
             f"loss α1 = 0.003; M ≥ {TOPK} is unrestricted routing exactly (the top-{TOPK} experts' devices are the "
             f"top devices by max affinity), M = 5 is left out. 'About as well' allows 0.5% of bits/byte. Devices "
             "per token are counted on 64 held-out sequences.")

    def measure(self, variant: Variant, run_dir: Path, ctx: Context) -> dict:
        model = load_pretrained(run_dir / "model").eval()
        seq_len = variant.spec["budget"]["seq_len"]
        return {"devices_per_token": devices_per_token(model, micro.held_out(ctx, 64, seq_len))}
