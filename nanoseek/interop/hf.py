"""Hugging Face checkpoints: DeepseekV2/V3 (and Llama for dense DeepSeek-LLM) safetensors + config.json.

On disk every routed expert has its own keys (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and MTP
module k is `model.layers.{num_hidden_layers + k}.*` with copies of the embedding and head, as
DeepSeek ships them; in memory experts are stacked and MTP modules live in `model.mtp`. FP8
checkpoints (float8_e4m3fn weights + `weight_scale_inv` per 128x128 block) are dequantized on load, or
kept in FP8 with `keep_fp8` (quant.fp8_weights: each weight dequantized whenever its layer runs).

Loading streams: the model is built on the meta device, then each tensor is read from its file straight into
its final place in the target dtype (a routed expert's weight into its slice of the stacked tensor), one file
open at a time. Plain reads, not safetensors' memory map: a mapped file's touched pages count in the
process's resident memory until the file is closed, GBs for a real checkpoint's shards. Peak memory is the
loaded model plus one tensor in flight (and a dequantized one's fp32 product).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.model.rope import rope_inv_freq
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.quant.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise
from nanoseek.quant.fp8_weights import holds_fp8, store_fp8
from nanoseek.utils import atomic_path, atomic_write_text, progress_bar

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
    if state_dict is None and holds_fp8(model):
        raise ValueError("this model holds FP8 weights (loaded with keep_fp8), which it cannot write; load its "
                         "checkpoint without keep_fp8 to save it")
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


def _from_hf_key(key: str, num_hidden_layers: int) -> tuple[str, int | None] | None:
    """Checkpoint key -> (nanoseek parameter name, routed expert index or None), or None for MTP's copies of the
    embedding and head (shared with the main model, V3 §2.2)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", key)
    if m and int(m.group(1)) >= num_hidden_layers:
        k, rest = int(m.group(1)) - num_hidden_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        own = rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head")
        key = f"mtp.{k}.{rest}" if own else f"mtp.{k}.block.{rest}"
    m = _EXPERT_HF.match(key)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return key, None


# ---------------------------------------------------------------------------- reading
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_SCALE = "_scale_inv"
# generation_config.json: DeepSeek-R1's recommended sampling, what transformers' generate() then uses.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}


@dataclass(frozen=True)
class _StoredTensor:
    """Where a tensor lies in a safetensors file (from the file's header)."""
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
        for name in files:
            # an index names files inside its own directory: not "../x", not an absolute path, not a FIFO
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index} lists {name!r}, which is not a file name in {path}")
            if not os.path.exists(os.path.join(path, name)):
                raise CheckpointError(f"{index} lists {name}, which does not exist")
        files = [os.path.join(path, name) for name in files]
    else:
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    for file in files:
        if not os.path.isfile(file):  # a FIFO or device would block or never end
            raise CheckpointError(f"{file} is not a regular file")
    if not files:
        extra = " (PyTorch .bin checkpoints are pickles; convert them to safetensors)" if any(
            f.endswith(".bin") for f in os.listdir(path)) else ""
        raise CheckpointError(f"no *.safetensors files in {path}{extra}")
    return files


def _header(file: str) -> dict[str, _StoredTensor]:
    """The tensors of a safetensors file (an 8-byte header length, a JSON header, the data), checked against
    the file's size."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"a {n}-byte header in a {size}-byte file")
            header = json.loads(f.read(n))
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{key} has dtype {info['dtype']}, which nanoseek does not read")
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"{key}'s data lies outside the file or does not fit its shape")
            out[key] = _StoredTensor(file, dtype, shape, 8 + n + begin, end - begin)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None


def _read(f: BinaryIO, t: _StoredTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor `t` read from its open file `f` into `out` (cast and moved as needed; default: a new CPU tensor)
    with plain reads: the bytes go straight into a CPU tensor of the stored dtype, else through one such copy."""
    direct = out is not None and out.dtype == t.dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(t.shape, dtype=t.dtype)
    f.seek(t.offset)
    if f.readinto(buf.reshape(-1).view(torch.uint8).numpy()) != t.nbytes:
        raise CheckpointError(f"cannot read {t.file}: it ends inside a tensor (truncated?)")
    if out is None or direct:
        return buf
    return out.copy_(buf)


class _Checkpoint:
    """A checkpoint directory's tensors as its files' headers describe them (no data read yet), the FP8 ones
    checked: every weight_scale_inv has its weight, in 128x128 blocks, and every FP8 weight its scale."""

    def __init__(self, path: str):
        self.path = path
        self.tensors: dict[str, _StoredTensor] = {}
        for file in _weight_files(path):
            for key, t in _header(file).items():
                if key in self.tensors:
                    raise CheckpointError(f"{key} is in both {self.tensors[key].file} and {file}")
                self.tensors[key] = t
        self.scales: dict[str, _StoredTensor] = {}
        """FP8 weight key -> its weight_scale_inv."""
        for key, s in self.tensors.items():
            if not key.endswith(".weight" + _SCALE):
                continue
            wkey = key[: -len(_SCALE)]
            if wkey not in self.tensors:
                raise CheckpointError(f"{s.file}: {key} has no matching {wkey}")
            w = self.tensors[wkey]
            expected = tuple(-(-d // 128) for d in w.shape)
            if len(w.shape) != 2 or s.shape != expected:
                raise CheckpointError(f"{s.file}: {key} has shape {s.shape}, expected {expected} for 128x128 blocks "
                                      f"of a {w.shape} weight")
            self.scales[wkey] = s
        for key, t in self.tensors.items():
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and key not in self.scales:
                raise CheckpointError(f"{t.file}: {key} is FP8 but has no weight_scale_inv")

    def dtype(self) -> torch.dtype:
        """The precision of its unquantized floating-point tensors (float32 when it has none)."""
        return next((t.dtype for k, t in self.tensors.items() if t.dtype.is_floating_point and k not in self.scales
                     and not k.endswith(_SCALE)), torch.float32)

    def plan(self, cfg: ModelConfig) -> tuple[dict[str, tuple[str, int | None]], dict[str, tuple[int, ...]]]:
        """(checkpoint key -> (parameter name, routed expert index or None), parameter name -> shape) for the
        tensors a model of `cfg` takes from here: experts stacked (all of them, alike), MTP's copies of the
        embedding and head and a tied head left out."""
        targets, shapes = {}, {}
        experts: dict[str, dict[int, str]] = defaultdict(dict)
        for key, t in self.tensors.items():
            target = None if key.endswith(".weight" + _SCALE) else _from_hf_key(key, cfg.num_hidden_layers)
            if target is None or (cfg.tie_word_embeddings and target[0] == "lm_head.weight"):
                continue
            if not t.dtype.is_floating_point:  # a copy into the model's float tensors would make up other values
                raise CheckpointError(f"{t.file}: {key} is {t.dtype}, not floating point: not a model weight")
            targets[key] = name, e = target
            if e is None:
                shapes[name] = t.shape
            else:
                experts[name][e] = key
        E = cfg.n_routed_experts
        for name, keys in experts.items():
            if sorted(keys) != list(range(E)):
                missing, extra = sorted(set(range(E)) - set(keys)), sorted(set(keys) - set(range(E)))
                prefix, proj = name.rsplit(".", 1)
                raise CheckpointError(f"{self.path}: {prefix}: " + (
                    f"experts {missing[:8]} are missing their {proj} weights" if missing else
                    f"experts {extra[:8]} are beyond its config's n_routed_experts = {E}"))
            shape = self.tensors[keys[0]].shape
            for key in keys.values():
                if self.tensors[key].shape != shape:
                    raise CheckpointError(f"{self.tensors[key].file}: {key} has shape {self.tensors[key].shape}, "
                                          f"expert 0's has {shape}")
            shapes[name] = (E, *shape)
        return targets, shapes

    def _by_file(self, keys) -> dict[str, list[str]]:
        """`keys` by file, each file's in the order they lie in it."""
        out: dict[str, list[str]] = defaultdict(list)
        for key in sorted(keys, key=lambda k: (self.tensors[k].file, self.tensors[k].offset)):
            out[self.tensors[key].file].append(key)
        return out

    def read_into(self, targets: dict[str, tuple[str, int | None]], dst: dict[str, torch.Tensor],
                  kept_scales: dict[str, torch.Tensor], done: Callable[[], object] = lambda: None) -> None:
        """Read each tensor of `targets` into its place in `dst` (its parameter, or its expert's slice of the
        stacked one), one file at a time: an FP8 weight dequantized into dst's dtype or, for the parameters in
        `kept_scales`, copied as it is, with its scales into kept_scales."""
        scales = {}  # all of them first (small: one number per 128x128 block), as a weight's may be in another file
        for file, keys in self._by_file([key + _SCALE for key in self.scales]).items():
            with open(file, "rb") as f:
                for key in keys:
                    scales[key[: -len(_SCALE)]] = _read(f, self.tensors[key])
        for file, keys in self._by_file(targets).items():
            with open(file, "rb") as f:
                for key in keys:
                    name, e = targets[key]
                    out = dst[name] if e is None else dst[name][e]
                    if key not in scales:
                        _read(f, self.tensors[key], out)
                    elif name in kept_scales:
                        _read(f, self.tensors[key], out)
                        (kept_scales[name] if e is None else kept_scales[name][e]).copy_(scales[key])
                    else:
                        out.copy_(dequantize_weight_blockwise(_read(f, self.tensors[key]), scales[key], dtype=out.dtype))
                    done()


def _expected(model) -> dict[str, torch.Tensor]:
    """The model's state dict, less a tied head (the embedding is the one stored)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _check(shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor], source: str, against: str
           ) -> list[str]:
    """Check that a checkpoint (`source`) holding parameters of `shapes` fits a model whose state dict is
    `expected`, strictly: any missing or unexpected key, or another shape, raises CheckpointError (`against`
    names what the checkpoint was checked against) — except a missing routing bias: V2 and V3 before aux-free
    training have none, and it is not written while all-zero. Returns those biases, to be zeros."""
    zeros = [k for k in expected if k not in shapes and k.endswith("e_score_correction_bias")]
    missing = [k for k in expected if k not in shapes and k not in zeros]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not match {against}: missing keys {_short(missing)}; "
                              f"unexpected keys {_short(unexpected)}")
    for k, shape in shapes.items():
        if tuple(shape) != tuple(expected[k].shape):
            raise CheckpointError(f"checkpoint {source}: {k} has shape {tuple(shape)}, {against} implies "
                                  f"{tuple(expected[k].shape)}")
    return zeros


def _short(keys: list[str], n: int = 6) -> str:
    return "[]" if not keys else f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", keep_fp8: bool = False, progress: str | None = None):
    """A DeepSeekForCausalLM in eval mode from a checkpoint directory (config.json + safetensors), its floating-point
    tensors in `dtype` (None: the checkpoint's). Streamed: see the module docstring.

    An FP8 checkpoint's weights are dequantized (the fp32 product, then `dtype`), unless `keep_fp8`: then they
    stay E4M3 with their block scales and are dequantized whenever their layer runs (quant.fp8_weights), to the
    same values; the model computes in `dtype`. keep_fp8 needs an FP8 checkpoint. `progress` names a progress
    bar over the tensors read (None: none)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_pretrained(path).replace(quantization_config=None)  # (in memory: dequantized, or stored)
    ckpt = _Checkpoint(path)
    if keep_fp8 and not ckpt.scales:
        raise CheckpointError(f"{path} is not an FP8 checkpoint (it has no weight_scale_inv tensors): keep_fp8 "
                              "(--fp8) keeps an FP8 checkpoint's weights in FP8; load this one without it")
    targets, shapes = ckpt.plan(cfg)
    if cfg.num_nextn_predict_layers and not any(name.startswith("mtp.") for name in shapes):
        # transformers drops the MTP layers when it saves; the main model is complete without them.
        warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint "
                      "has no MTP weights; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    expected = _expected(model)
    zeros = _check(shapes, expected, path, against="its config.json")
    dtype = dtype or ckpt.dtype()
    keys: dict[str, list[str]] = defaultdict(list)  # parameter -> its checkpoint keys (one, or one per expert)
    for key, (name, _) in targets.items():
        keys[name].append(key)
    kept = {name for name, ks in keys.items() if keep_fp8 and all(k in ckpt.scales for k in ks)}
    dst, scales = {}, {}
    for name, shape in shapes.items():
        first = keys[name][0]
        if name in kept:
            dst[name] = torch.empty(shape, dtype=ckpt.tensors[first].dtype, device=device)
            s = ckpt.scales[first]
            scales[name] = torch.empty((*shape[:-2], *s.shape), dtype=s.dtype, device=device)
        else:
            own = expected[name].dtype
            dst[name] = torch.empty(shape, dtype=dtype if own.is_floating_point else own, device=device)
    with progress_bar(progress is not None, total=len(targets), desc=progress, unit="tensor") as bar:
        ckpt.read_into(targets, dst, scales, bar.update)
    dst.update({name: torch.zeros(expected[name].shape, dtype=dtype, device=device) for name in zeros})
    model.load_state_dict({k: t for k, t in dst.items() if k not in kept}, strict=False, assign=True)
    for name in kept:
        module, attr = name.rsplit(".", 1)
        store_fp8(model.get_submodule(module), attr, dst[name], scales[name], dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.to_empty(device=device)  # non-persistent buffer: recompute it off the meta device
    model.rotary.inv_freq.copy_(rope_inv_freq(model.rotary.inv_freq.numel() * 2, cfg.rope_theta, cfg.rope_scaling)[0])
    return model.eval()


@torch.no_grad()
def load_weights(model, path: str | os.PathLike) -> None:
    """Read a checkpoint directory's weights into `model` in place, strictly (names and shapes checked against the
    model), FP8 weights dequantized, everything cast to the model's dtypes; streamed as `load_pretrained` is."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    ckpt = _Checkpoint(path)
    targets, shapes = ckpt.plan(model.config)
    expected = _expected(model)
    for name in _check(shapes, expected, path, against="the model"):
        expected[name].zero_()
    ckpt.read_into(targets, expected, {})


# ---------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size = {size!r} is invalid: use bytes or e.g. '500MB', '5GB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def is_fp8_eligible(key: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's FP8 checkpoints quantize the decoder's linear weights (MLA's kv_a_proj_with_mqa too), but
    not embeddings, heads, norms, the router or MTP's eh_proj."""
    return (t.dim() == 2 and key.startswith("model.layers.") and key.endswith(("_proj.weight", "_proj_with_mqa.weight"))
            and ".eh_proj." not in key)


def shard_layout(sizes: dict[str, int], max_shard_size: int | str = "5GB") -> dict[str, list[str]]:
    """File name -> its keys, for tensors of `sizes` bytes (in that order): files of at most max_shard_size (a
    larger tensor alone in one), named as transformers names them; one `model.safetensors` when all fit in one."""
    limit = _parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for key, nbytes in sizes.items():
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return dict(zip(names, shards))


def write_checkpoint(path: str | os.PathLike, layout: dict[str, list[str]],
                     tensors: Callable[[list[str]], dict[str, torch.Tensor]], config: ModelConfig,
                     progress: str | None = None) -> None:
    """Write a checkpoint directory: each file of `layout` (atomically) with the tensors `tensors(keys)` gives for
    its keys — one file's worth in memory at a time —, the index when there are several files, and config.json.
    Shards of an earlier checkpoint in `path` are removed."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    weight_map, total, dtype = {}, 0, None
    with progress_bar(progress is not None, total=sum(map(len, layout.values())), desc=progress, unit="tensor") as bar:
        for name, keys in layout.items():
            shard = {k: t.contiguous() for k, t in tensors(keys).items()}
            dtype = dtype or next((t.dtype for t in shard.values() if t.dtype in (torch.float32, torch.bfloat16,
                                                                                  torch.float16)), None)
            with atomic_path(os.path.join(path, name)) as tmp:
                save_file(shard, tmp, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update(dict.fromkeys(shard, name))
            bar.update(len(keys))
            del shard
    stale = [f for f in os.listdir(path) if f.endswith(".safetensors") and f not in layout]
    if len(layout) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(os.path.join(path, INDEX), json.dumps(index, indent=2) + "\n")
    elif os.path.exists(os.path.join(path, INDEX)):
        os.remove(os.path.join(path, INDEX))
    for f in stale:
        os.remove(os.path.join(path, f))
    config.save(os.path.join(path, "config.json"), torch_dtype=dtype and str(dtype).removeprefix("torch."))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, **GENERATION_DEFAULTS}
    atomic_write_text(os.path.join(path, "generation_config.json"), json.dumps(generation, indent=2) + "\n")


def transformers_mismatch(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why transformers would load these checkpoint tensors as a different model, or None: routing its
    DeepseekV2/V3 routers do not implement. V2's is softmax, greedy or group-limited by the best expert, never
    renormalized, and has no bias; V3's is sigmoid with the bias, group-limited by the top-2 sum whenever
    n_group > 1; neither limits devices (`topk_devices`)."""
    if config.model_type not in ("deepseek_v2", "deepseek_v3") or not config.is_moe:
        return None
    c, v2 = config, config.model_type == "deepseek_v2"
    name = "DeepseekV2" if v2 else "DeepseekV3"
    scoring = "softmax" if v2 else "sigmoid"
    if c.scoring_func != scoring:
        return f"scoring_func = {c.scoring_func!r}, but transformers' {name} router always uses {scoring}"
    if v2 and c.topk_method not in ("greedy", "group_limited_greedy"):
        return f"topk_method = {c.topk_method!r}, which transformers' DeepseekV2 router does not implement"
    if v2 and c.norm_topk_prob and c.num_experts_per_tok > 1:
        return "norm_topk_prob = True, but transformers' DeepseekV2 router never renormalizes the top-k weights"
    if not v2 and (c.n_group or 1) > 1 and c.topk_method != "noaux_tc":
        return (f"topk_method = {c.topk_method!r} with n_group = {c.n_group}, but transformers' DeepseekV3 router "
                "always limits groups by their top-2 sum (noaux_tc)")
    if c.topk_devices is not None:
        return f"topk_devices = {c.topk_devices} (device-limited routing), which transformers does not implement"
    biased = v2 and next((k for k, t in tensors.items() if k.endswith("e_score_correction_bias") and t.any()), None)
    if biased:
        return (f"{biased} is non-zero (aux-loss-free balancing), but transformers' DeepseekV2 router has no bias; "
                "train the deepseek_v2 layout with balance.bias_update_speed=0, or use the deepseek_v3 layout (its "
                "router keeps the bias)")
    return None


def save_pretrained(model, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, fp8: bool = False,
                    state_dict: dict[str, torch.Tensor] | None = None, nanoseek_only: bool = False,
                    progress: str | None = None) -> None:
    """Write config.json and safetensors shards (with an index when sharded); each file atomically.
    `state_dict` replaces the model's own (a sharded model's, gathered).

    `fp8` writes DeepSeek-V3's block-scaled FP8 layout (weight + weight_scale_inv, 128x128 blocks).
    A model that transformers would compute differently (`transformers_mismatch`) is refused with
    CheckpointError unless `nanoseek_only`: then it is written whole, and nanoseek loads it exactly. `progress`
    names a progress bar over the tensors written."""
    hf_state = to_hf_state_dict(model, state_dict)
    mismatch = transformers_mismatch(model.config, hf_state)
    if mismatch and not nanoseek_only:
        raise CheckpointError(f"cannot export {path} for transformers: {mismatch}, so it would load there as a "
                              "different model (nanoseek itself loads a run's model/ as it is)")
    tensors = {}
    for k, t in hf_state.items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if fp8 and is_fp8_eligible(k, t):
            t, tensors[k + _SCALE] = quantize_weight_blockwise(t)
        tensors[k] = t
    layout = shard_layout({k: t.numel() * t.element_size() for k, t in tensors.items()}, max_shard_size)
    cfg = model.config.replace(quantization_config=FP8_QUANTIZATION_CONFIG) if fp8 else model.config
    write_checkpoint(path, layout, lambda keys: {k: tensors[k] for k in keys}, cfg, progress)
