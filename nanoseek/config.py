"""Model configuration: transformers' DeepseekV3Config / DeepseekV2Config field names, validated.

A `config.json` written by transformers (or shipped with a DeepSeek checkpoint) loads unchanged:
`ModelConfig(**json.load(f))` or `ModelConfig.from_pretrained(dir)`. Fields transformers lacks are
added with names that say what they are and defaults that reproduce DeepSeek-V3:
`attention_type` (mla | mha | gqa | mqa, the latter three for the dense DeepSeek-LLM models),
`ep_size` / `topk_devices` (device-limited routing) and the balance-loss weights (the single home of
those: training configs set them as model overrides).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from nanoseek.utils import atomic_write_text

ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")
YARN_DEFAULTS = {"factor": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}

# What each field's annotation admits, as config.json / TOML spell it. bool is an int to Python; never here.
_KINDS = {
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a float", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list[int]": ("a list of ints", lambda v: isinstance(v, list) and all(_KINDS["int"][1](x) for x in v)),
    "None": ("null", lambda v: v is None),
}

# Keys of HF config.json files that carry no model semantics for us; accepted and dropped.
_IGNORED_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pretraining_tp", "output_router_logits", "aux_loss_alpha", "seq_aux", "moe_layer_freq",
    "_name_or_path", "mlp_bias", "num_mtp_layers", "qk_head_dim", "router_aux_loss_coef",
    "num_local_experts",
    "mtp_loss_weight",  # written by nanoseek < 0.2; the MTP weight is a training setting ([mtp] weight)
}


@dataclass(init=False, eq=False)
class ModelConfig:
    """Shape and behaviour of a DeepSeek model (defaults: DeepSeek-V3)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    """Width of the dense MLP (layers before `first_k_dense_replace`, or every layer of a dense model)."""
    moe_intermediate_size: int = 2048
    """Width of one routed expert; shared experts are `n_shared_experts` times this."""
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    """K/V heads for mha/gqa/mqa; MLA ignores it (transformers sets it equal to the heads)."""
    head_dim: int | None = None
    """Head width for mha/gqa/mqa (default hidden_size // num_attention_heads)."""
    attention_type: str = "mla"
    """mla (DeepSeek-V2/V3) or mha / gqa / mqa (DeepSeek-LLM 7B/67B)."""
    q_lora_rank: int | None = 1536
    """Query compression rank d'_c; None projects queries directly (V2-Lite)."""
    kv_lora_rank: int = 512
    """Latent KV rank d_c: what the MLA cache stores per token, with the RoPE key."""
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 256
    """Routed experts per MoE layer; 0 or None gives a dense model."""
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    """Router affinity: sigmoid (V3) or softmax (V2)."""
    topk_method: str = "noaux_tc"
    """greedy; group_limited_greedy (V2: group score = max); noaux_tc (V3: sum of top-2, bias)."""
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    """Renormalize the selected gate values to sum to one (V3) before routed_scaling_factor."""
    first_k_dense_replace: int = 3
    ep_size: int = 1
    """Devices the routed experts are spread over (contiguous blocks), for device-limited routing."""
    topk_devices: int | None = None
    """Device-limited routing (V2): experts only from the top-M devices by max affinity; None = off."""
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None or YaRN: {rope_type: yarn, factor, original_max_position_embeddings, beta_fast, ...}."""
    rope_interleave: bool = True
    """RoPE on interleaved pairs (DeepSeek's MLA weights) instead of halves (Llama layout)."""
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1
    """Multi-token prediction depth D (V3: 1)."""
    seq_aux_alpha: float = 0.0001
    """V3 sequence-wise balance loss α (0 = off)."""
    expert_aux_alpha: float = 0.0
    """V2/DeepSeekMoE expert-level balance loss α1 (0 = off)."""
    device_aux_alpha: float = 0.0
    """V2 device-level balance loss α2, over `ep_size` devices (0 = off)."""
    comm_aux_alpha: float = 0.0
    """V2 communication balance loss α3, needs `topk_devices` (0 = off)."""
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    """Written to config.json: deepseek_v3, deepseek_v2, or llama (dense DeepSeek-LLM layout)."""
    quantization_config: dict | None = None
    """Present in FP8 checkpoints (weights are dequantized on load; loading clears it)."""
    extra: dict = field(default_factory=dict, repr=False)
    """Unknown config.json keys, carried through unchanged."""

    # ---------------------------------------------------------------- construction
    def __init__(self, **kwargs: Any):
        known = {f.name for f in fields(self)}
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = _normalize_rope(kwargs.pop("rope_scaling", None), kwargs.pop("rope_parameters", None))
        model_type = kwargs.get("model_type")
        if model_type == "llama":
            kwargs = _from_llama(kwargs)
        if model_type == "deepseek_v2":  # transformers' V2 defaults differ from V3's
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
            kwargs.setdefault("first_k_dense_replace", 0)
            kwargs.setdefault("num_nextn_predict_layers", 0)
            kwargs.setdefault("n_group", None)
            kwargs.setdefault("topk_group", None)
            kwargs.setdefault("n_shared_experts", 2)
            kwargs.setdefault("n_routed_experts", 64)
        extra = dict(kwargs.pop("extra", {}) or {})
        for f in fields(self):
            if f.name in kwargs:
                value = kwargs.pop(f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()
            setattr(self, f.name, value)
        if rope_theta is not None:
            self.rope_theta = float(rope_theta)
        if rope_scaling is not None:
            self.rope_theta = float(rope_scaling.pop("rope_theta", self.rope_theta))
            self.rope_scaling = rope_scaling or None
        for k, v in kwargs.items():
            if k not in _IGNORED_KEYS and k not in known:
                extra[k] = v
        self.extra = extra
        if self.num_key_value_heads is None or self.attention_type == "mla":
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_type == "mla":
            self.head_dim = None  # transformers writes qk_rope_head_dim here; MLA derives its widths
        if not self.n_routed_experts:
            self.n_routed_experts = 0
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def is_mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """Head width of mha/gqa/mqa attention."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """MLA: (d_h + d_h^R)^-0.5, times mscale² under YaRN (transformers' rule: mscale_all_dim)."""
        dim = self.qk_head_dim if self.is_mla else self.attn_head_dim
        scale = dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name, allowed):
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r} is invalid: {allowed}")

        # Types first: a string from --set or config.json would otherwise fail as a TypeError deep inside, or pass.
        for f in fields(self):
            kinds = [_KINDS[k.strip()] for k in f.type.split("|")] if f.name != "extra" else []
            if kinds and not any(ok(getattr(self, f.name)) for _, ok in kinds):
                bad(f.name, "must be " + " or ".join(name for name, _ in kinds))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.attention_type not in ATTENTION_TYPES:
            bad("attention_type", f"allowed: {', '.join(ATTENTION_TYPES)}")
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                    bad(name, "must be a positive integer for MLA")
            if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
                bad("q_lora_rank", "must be a positive integer or null (no query compression)")
            rope_dim = self.qk_rope_head_dim
        else:
            kv = self.num_key_value_heads
            if not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv:
                bad("num_key_value_heads", f"must divide num_attention_heads = {self.num_attention_heads}")
            expected = {"mha": self.num_attention_heads, "mqa": 1}.get(self.attention_type)
            if expected is not None and kv != expected:
                bad("num_key_value_heads", f"{self.attention_type} needs {expected}")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                bad("hidden_size", f"must be divisible by num_attention_heads = {self.num_attention_heads} "
                                   "(or set head_dim)")
            rope_dim = self.attn_head_dim
        if rope_dim % 2:
            bad("qk_rope_head_dim" if self.is_mla else "head_dim", "the RoPE dimension must be even")
        if self.intermediate_size <= 0 and (not self.is_moe or self.first_k_dense_replace > 0):
            bad("intermediate_size", "must be positive")
        if self.n_routed_experts < 0:
            bad("n_routed_experts", "must be >= 0 (0 = dense)")
        if self.is_moe:
            self._validate_moe(bad)
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"allowed: {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"allowed: {', '.join(TOPK_METHODS)}")
        if self.hidden_act != "silu":
            bad("hidden_act", "only silu (SwiGLU) is implemented")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be an integer >= 0")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be positive")
        for name in ("seq_aux_alpha", "expert_aux_alpha", "device_aux_alpha", "comm_aux_alpha"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.get("rope_type") not in ROPE_TYPES:
                bad("rope_scaling", f"rope_type must be one of {', '.join(ROPE_TYPES)}")
            if rs.get("rope_type") == "yarn" and not (rs["factor"] >= 1 and rs["original_max_position_embeddings"] > 0):
                bad("rope_scaling", "yarn needs factor >= 1 and original_max_position_embeddings > 0")
        if self.quantization_config is not None:
            qc = self.quantization_config
            if qc.get("quant_method") not in (None, "fp8") or list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                bad("quantization_config", "only fp8 with weight_block_size [128, 128] is supported")

    def _validate_moe(self, bad) -> None:
        E, k = self.n_routed_experts, self.num_experts_per_tok
        if not isinstance(k, int) or not 0 < k <= E:
            bad("num_experts_per_tok", f"must be in 1..n_routed_experts = {E}")
        if self.moe_intermediate_size <= 0:
            bad("moe_intermediate_size", "must be positive")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
        available = E
        if self.topk_method in ("group_limited_greedy", "noaux_tc") and (self.n_group or 1) > 1:
            G, g = self.n_group, self.topk_group
            if E % G:
                bad("n_routed_experts", f"must be divisible by n_group = {G}")
            if not isinstance(g, int) or not 0 < g <= G:
                bad("topk_group", f"must be in 1..n_group = {G}")
            if self.topk_method == "noaux_tc" and E // G < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group")
            available = g * E // G
        if self.topk_devices is not None:
            D, M = self.ep_size, self.topk_devices
            if E % D:
                bad("n_routed_experts", f"must be divisible by ep_size = {D}")
            if not 0 < M <= D:
                bad("topk_devices", f"must be in 1..ep_size = {D}")
            available = min(available, M * E // D)
        elif self.ep_size < 1 or E % self.ep_size:
            bad("ep_size", f"must be >= 1 and divide n_routed_experts = {E}")
        if k > available:
            bad("num_experts_per_tok", f"the kept groups/devices hold only {available} experts")
        if self.comm_aux_alpha and self.topk_devices is None:
            bad("comm_aux_alpha", "the communication balance loss needs device-limited routing (topk_devices)")

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "rope_scaling")}
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (and vLLM/SGLang) load, in DeepSeek's own key style."""
        d = self.to_dict()
        d.update(self.extra)
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        if self.model_type == "llama":
            for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor",
                      "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
                      "first_k_dense_replace", "moe_intermediate_size", "ep_size", "topk_devices"):
                d.pop(k)
            d["architectures"] = ["LlamaForCausalLM"]
            d["head_dim"] = self.attn_head_dim
        else:
            d["architectures"] = ["DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"]
            if self.is_mla:  # transformers' MLA convention: head_dim is the RoPE width
                d["num_key_value_heads"] = self.num_attention_heads
                d["head_dim"] = self.qk_rope_head_dim
        return d

    def save(self, path: str | os.PathLike, torch_dtype: str | None = None) -> None:
        """config.json; `torch_dtype` ("bfloat16", ...): the weights' dtype, which transformers loads them in."""
        d = self.to_hf_dict()
        if torch_dtype is not None:
            d["torch_dtype"] = torch_dtype
        atomic_write_text(path, json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a model config must be a JSON object, not {type(data).__name__}")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        return cls.from_json(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig(**{**self.to_dict(), "extra": self.extra, **changes})

    def __eq__(self, other):
        return isinstance(other, ModelConfig) and self.to_dict() == other.to_dict()


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalize_rope(rope_scaling: dict | None, rope_parameters: dict | None) -> dict | None:
    """Accept legacy `rope_scaling` ({type|rope_type: yarn, ...}) and transformers 5 `rope_parameters`.

    Returns None when neither is given, {} for plain RoPE (possibly with rope_theta), or a YaRN dict.
    """
    src = rope_parameters if rope_parameters is not None else rope_scaling
    if src is None:
        return None
    if not isinstance(src, dict):
        raise ValueError(f"ModelConfig.rope_scaling = {src!r} is invalid: must be a dict or null")
    src = dict(src)
    rope_type = src.pop("rope_type", None) or src.pop("type", None) or "default"
    src.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"ModelConfig.rope_scaling.rope_type = {rope_type!r} is invalid: allowed: {', '.join(ROPE_TYPES)}")
    out = {"rope_theta": float(src.pop("rope_theta"))} if "rope_theta" in src else {}
    if rope_type == "yarn":
        out.update({"rope_type": "yarn", **YARN_DEFAULTS, **{k: v for k, v in src.items() if v is not None}})
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
        out["mscale"] = float(out["mscale"])
        out["mscale_all_dim"] = float(out["mscale_all_dim"])
    return out


def _from_llama(d: dict) -> dict:
    """A DeepSeek-LLM config.json (transformers' LlamaForCausalLM layout) as a dense ModelConfig."""
    d = dict(d)
    heads = d.get("num_attention_heads", 32)
    kv = d.get("num_key_value_heads") or heads
    d.setdefault("attention_type", "mha" if kv == heads else "mqa" if kv == 1 else "gqa")
    d["num_key_value_heads"] = kv
    d["model_type"] = "llama"
    d.setdefault("n_routed_experts", 0)
    d.setdefault("num_nextn_predict_layers", 0)
    d.setdefault("rope_interleave", False)
    d.setdefault("first_k_dense_replace", 0)
    d.setdefault("seq_aux_alpha", 0.0)
    return d


_TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # tiny: a few hundred thousand parameters, every feature switched on, for tests; 300 tokens hold the
    # smallest byte-level BPE (256 bytes + 7 special tokens) with a few merges.
    "tiny-v3": dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                    n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
                    qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
                    num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
                    rope_scaling=_TINY_YARN, num_nextn_predict_layers=1),
    "tiny-v2": dict(model_type="deepseek_v2", vocab_size=300, hidden_size=64, intermediate_size=128,
                    moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                    n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=1.0, kv_lora_rank=32,
                    q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=4,
                    topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=False,
                    scoring_func="softmax", topk_method="group_limited_greedy", max_position_embeddings=128,
                    rope_scaling={**_TINY_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                    num_nextn_predict_layers=0, seq_aux_alpha=0.0, expert_aux_alpha=0.003),
    "tiny-dense": dict(model_type="llama", attention_type="gqa", vocab_size=300, hidden_size=64,
                       intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       n_routed_experts=0, max_position_embeddings=128, rope_interleave=False,
                       num_nextn_predict_layers=0, seq_aux_alpha=0.0, initializer_range=0.006),
    # small: ~30M total / ~10M active parameters, V3-shaped, for CPU training runs.
    "small-v3": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                     num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                     n_routed_experts=32, routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=128,
                     qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64, n_group=4, topk_group=2,
                     num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=1024,
                     num_nextn_predict_layers=1),
    # Published shapes (build on the meta device to count parameters and FLOPs).
    "deepseek-v3": dict(rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                        max_position_embeddings=163840),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, first_k_dense_replace=1, routed_scaling_factor=1.0,
                             scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                             norm_topk_prob=False, num_nextn_predict_layers=0, max_position_embeddings=163840,
                             bos_token_id=100000, eos_token_id=100001, seq_aux_alpha=0.0, expert_aux_alpha=0.001,
                             rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                                           "mscale_all_dim": 0.707}),
    "deepseek-llm-7b": dict(model_type="llama", attention_type="mha", vocab_size=102400, hidden_size=4096,
                            intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                            num_key_value_heads=32, n_routed_experts=0, rope_interleave=False,
                            num_nextn_predict_layers=0, seq_aux_alpha=0.0, bos_token_id=100000,
                            eos_token_id=100001, initializer_range=0.006),
    "deepseek-llm-67b": dict(model_type="llama", attention_type="gqa", vocab_size=102400, hidden_size=8192,
                             intermediate_size=22016, num_hidden_layers=95, num_attention_heads=64,
                             num_key_value_heads=8, n_routed_experts=0, rope_interleave=False,
                             num_nextn_predict_layers=0, seq_aux_alpha=0.0, bos_token_id=100000,
                             eos_token_id=100001, initializer_range=0.006),
}
