"""Scaling tools: FLOPs/params per token (flops.py) and DeepSeek LLM's power-law fits (laws.py)."""

from nanoseek.scaling.flops import (
    FlopsPerToken,
    ParamCounts,
    count_params,
    deepseek_llm_flops_per_token,
    deepseek_llm_param_counts,
    training_flops_per_token,
)
from nanoseek.scaling.laws import (
    IsoFLOPFit,
    fit_isoflop,
    fit_power_law,
    optimal_batch_size,
    optimal_data_scale,
    optimal_learning_rate,
    optimal_model_scale,
)

__all__ = [
    "FlopsPerToken",
    "IsoFLOPFit",
    "ParamCounts",
    "count_params",
    "deepseek_llm_flops_per_token",
    "deepseek_llm_param_counts",
    "fit_isoflop",
    "fit_power_law",
    "optimal_batch_size",
    "optimal_data_scale",
    "optimal_learning_rate",
    "optimal_model_scale",
    "training_flops_per_token",
]
