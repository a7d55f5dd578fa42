"""Hugging Face checkpoints: DeepseekV2/V3 (and Llama for dense DeepSeek-LLM) safetensors + config.json.

On disk every routed expert has its own keys (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and MTP
module k is `model.layers.{num_hidden_layers + k}.*` with copies of the embedding and head, as
DeepSeek ships them; in memory experts are stacked and MTP modules live in `model.mtp`. FP8
checkpoints (float8_e4m3fn weights + `weight_scale_inv` per 128x128 block) are dequantized on load.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.model.rope import rope_inv_freq
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.quant.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from nanoseek.utils import atomic_path, atomic_write_text

INDEX = "model.safetensors.index.json"
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_EXPERT_HF = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP = re.compile(r"^mtp\.(\d+)\.(block\.)?(.*)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names the files and keys at fault."""


# ---------------------------------------------------------------------------- key mapping
def to_hf_state_dict(model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """nanoseek parameter names -> checkpoint keys (experts split, MTP renamed, copies added), of
    `state_dict` (default: the model's own)."""
    cfg: ModelConfig = model.config
    L, out = cfg.num_hidden_layers, {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        t = t.detach()
        if name.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc" and not t.any():
            continue  # V2 checkpoints have no bias; keep one only when it carries information
        m = _MTP.match(name)
        if m:
            name = f"model.layers.{L + int(m.group(1))}.{m.group(3)}"
        m = _EXPERT.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].clone()  # safetensors refuses views
            continue
        out[name] = t
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's MTP layers carry their own copies
        out[f"model.layers.{L + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{L + k}.shared_head.head.weight"] = out.get("lm_head.weight", out["model.embed_tokens.weight"]).clone()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> nanoseek parameter names (experts stacked, MTP renamed, copies dropped)."""
    L = cfg.num_hidden_layers
    own_keys = {"enorm", "hnorm", "eh_proj", "shared_head"}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    out = {}
    for key, t in tensors.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", key)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model (V3 §2.2)
            key = f"mtp.{k}.{rest}" if rest.split(".")[0] in own_keys else f"mtp.{k}.block.{rest}"
        m = _EXPERT_HF.match(key)
        if m:
            experts[(m.group(1), m.group(3))][int(m.group(2))] = t
            continue
        out[key] = t
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(per_expert))
            raise CheckpointError(f"{prefix}: experts {missing[:8]} are missing their {proj} weights")
        out[f"{prefix}.{proj}"] = torch.stack([per_expert[e] for e in range(cfg.n_routed_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# ---------------------------------------------------------------------------- reading
def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise CheckpointError(f"{index} lists {name}, which does not exist")
        return [os.path.join(path, name) for name in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        extra = " (PyTorch .bin checkpoints are pickles; convert them to safetensors)" if any(
            f.endswith(".bin") for f in os.listdir(path)) else ""
        raise CheckpointError(f"no *.safetensors files in {path}{extra}")
    return [os.path.join(path, f) for f in files]


def read_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory by key, FP8 weights dequantized, cast to `dtype`."""
    path = os.fspath(path)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    origin[key] = file
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None
    for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wkey = key[: -len("_scale_inv")]
        if wkey not in tensors:
            raise CheckpointError(f"{origin[key]}: {key} has no matching {wkey}")
        w, s = tensors[wkey], tensors.pop(key)
        expected = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        if tuple(s.shape) != expected:
            raise CheckpointError(f"{origin[key]}: {key} has shape {tuple(s.shape)}, expected {expected} for "
                                  f"128x128 blocks of a {tuple(w.shape)} weight")
        tensors[wkey] = dequantize_weight_blockwise(w, s, dtype=torch.float32)
    for key, t in tensors.items():
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{origin[key]}: {key} is FP8 but has no weight_scale_inv")
        if dtype is not None and t.is_floating_point():
            tensors[key] = t.to(dtype)
    return tensors


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu"):
    """A DeepSeekForCausalLM from a checkpoint directory (config.json + safetensors)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_pretrained(path)
    cfg = cfg.replace(quantization_config=None)  # dequantized below: the model in memory is not FP8
    tensors = read_checkpoint(path, dtype=dtype)
    if dtype is None:  # keep the checkpoint's precision, but never compute in FP8
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    state = from_hf_state_dict(tensors, cfg)
    if cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        # transformers drops the MTP layers when it saves; the main model is complete without them.
        warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                      "has no MTP weights; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    check_state_dict(state, model.state_dict(), path, against="its config.json")
    state = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.to_empty(device=device)  # non-persistent buffer: recompute it off the meta device
    model.rotary.inv_freq.copy_(rope_inv_freq(model.rotary.inv_freq.numel() * 2, cfg.rope_theta, cfg.rope_scaling)[0])
    return model.eval()


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str | os.PathLike,
                     against: str) -> None:
    """Make `state` (read from checkpoint `source`) fit a model whose state dict is `expected`, strictly:
    a routing bias the checkpoint lacks is added as zeros (V2 and V3 before aux-free training have none, and
    it is not written while all-zero); any other missing or unexpected key, or another shape, raises
    CheckpointError (`against` names what the checkpoint was checked against)."""
    for k in [k for k in expected if k not in state and k.endswith("e_score_correction_bias")]:
        state[k] = torch.zeros(expected[k].shape, dtype=expected[k].dtype)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not match {against}: missing keys {_short(missing)}; "
                              f"unexpected keys {_short(unexpected)}")
    for k, t in state.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"checkpoint {source}: {k} has shape {tuple(t.shape)}, {against} implies "
                                  f"{tuple(expected[k].shape)}")


def _short(keys: list[str], n: int = 6) -> str:
    return "[]" if not keys else f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size = {size!r} is invalid: use bytes or e.g. '500MB', '5GB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def is_fp8_eligible(key: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's FP8 checkpoints quantize the decoder's linear weights, but not embeddings, heads,
    norms, the router or MTP's eh_proj."""
    return (t.dim() == 2 and key.startswith("model.layers.") and key.endswith("_proj.weight")
            and ".eh_proj." not in key)


def save_pretrained(model, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, fp8: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and safetensors shards (with an index when sharded); each file atomically.
    `state_dict` replaces the model's own (a sharded model's, gathered).

    `fp8` writes DeepSeek-V3's block-scaled FP8 layout (weight + weight_scale_inv, 128x128 blocks)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = {}
    for k, t in to_hf_state_dict(model, state_dict).items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if fp8 and is_fp8_eligible(k, t):
            t, tensors[k + "_scale_inv"] = quantize_weight_blockwise(t)
        tensors[k] = t.contiguous()
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with atomic_path(os.path.join(path, name)) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
    stale = [f for f in os.listdir(path) if f.endswith(".safetensors") and f not in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic_write_text(os.path.join(path, INDEX), json.dumps(index, indent=2) + "\n")
    elif os.path.exists(os.path.join(path, INDEX)):
        os.remove(os.path.join(path, INDEX))
    for f in stale:
        os.remove(os.path.join(path, f))
    cfg = model.config.replace(quantization_config=FP8_QUANTIZATION_CONFIG) if fp8 else model.config
    cfg.save(os.path.join(path, "config.json"))
