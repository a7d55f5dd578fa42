"""Paper ablations and scaling laws reproduced at micro scale (`nanoseek experiment`).

Each experiment is an `Experiment` (core.py) in a module of this package; `get(name)` imports it on
demand, so one experiment's dependencies never slow down or break another's.
"""
from __future__ import annotations

import importlib

from nanoseek.experiments.core import (
    Check,
    Context,
    Experiment,
    Metric,
    Variant,
    run_experiment,
)

# name → "module:class", in the order `nanoseek experiment all` runs them
EXPERIMENTS: dict[str, str] = {
    "mla": "nanoseek.experiments.attention:MLAExperiment",
    "moe": "nanoseek.experiments.moe:MoEExperiment",
    "balance": "nanoseek.experiments.moe:BalanceExperiment",
    "routing": "nanoseek.experiments.moe:RoutingExperiment",
    "mtp": "nanoseek.experiments.mtp:MTPExperiment",
    "fp8": "nanoseek.experiments.fp8:FP8Experiment",
    "scaling": "nanoseek.experiments.scaling:ScalingExperiment",
    "r1": "nanoseek.experiments.r1:R1Experiment",
}


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; allowed: {', '.join(EXPERIMENTS)}")
    module, cls = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["EXPERIMENTS", "Check", "Context", "Experiment", "Metric", "Variant", "get", "run_experiment"]
