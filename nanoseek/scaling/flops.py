"""Compute and parameter counts — DeepSeek LLM §3 (model scale M) and the V2/V3 architectures.

DeepSeek LLM §3.2 measures model scale by non-embedding FLOPs per token,
    M = 72·n_layer·d_model² + 12·n_layer·d_model·l_seq,
instead of parameter counts: 6·N1 (non-embedding params) misses attention's sequence term and
6·N2 adds the vocabulary, which does little compute; both mis-state small models' cost by up to 50%.
Compute is then C = M·D for D training tokens.

``training_flops_per_token`` extends M to DeepSeek MoE/MLA models from their shape fields (the HF
DeepseekV2/V3 config names), counting what a token actually multiplies: MLA's low-rank
projections, the router, only the activated routed experts plus the shared ones, the attention
score/value products, the lm_head and the MTP modules. Conventions follow M: training = 3 ×
forward (backward costs two forwards), 2 FLOPs per multiply-add, and each query attends to all
l_seq keys (causal masking is not subtracted). Norms, activations and softmax are not counted.
All functions take plain numbers so ``**dataclasses.asdict(cfg)`` works; unknown keys are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

_TRAIN = 6  # 2 FLOPs per multiply-add × (1 forward + 2 backward)


def deepseek_llm_flops_per_token(n_layer: int, d_model: int, seq_len: int) -> int:
    """M = 72·n_layer·d_model² + 12·n_layer·d_model·l_seq (DeepSeek LLM Eq. 2)."""
    return 72 * n_layer * d_model**2 + 12 * n_layer * d_model * seq_len


def deepseek_llm_param_counts(n_layer: int, d_model: int, vocab_size: int) -> tuple[int, int]:
    """(N1, N2) of DeepSeek LLM Table 3: N1 = 12·n_layer·d² non-embedding, N2 = N1 + vocab·d."""
    n1 = 12 * n_layer * d_model**2
    return n1, n1 + vocab_size * d_model


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (forward + backward), split by where they are spent."""

    attention_proj: int  # q/k/v/o projections, MLA's down/up projections included
    attention_scores: int  # q·k and p·v over l_seq keys
    mlp: int  # dense MLPs, shared experts and the activated routed experts
    router: int  # MoE gate logits
    lm_head: int  # output projection over the vocabulary
    mtp: int  # multi-token-prediction modules, their lm_head applications included

    @property
    def non_embedding(self) -> int:
        """DeepSeek LLM's M for the main model: everything but the vocabulary projection and MTP."""
        return self.attention_proj + self.attention_scores + self.mlp + self.router

    @property
    def total(self) -> int:
        return self.non_embedding + self.lm_head + self.mtp


@dataclass(frozen=True)
class ParamCounts:
    """Main-model parameters (MTP modules excluded, as the papers' 671B/37B are)."""

    total: int
    activated: int  # used per token: all but the embedding table and the unselected routed experts
    embedding: int


@dataclass(frozen=True)
class _Shape:
    """The shape fields this module reads, validated once, with HF DeepseekV3Config meanings."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int
    attention_type: str
    q_lora_rank: int | None
    kv_lora_rank: int | None
    qk_nope_head_dim: int | None
    qk_rope_head_dim: int | None
    v_head_dim: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    n_routed_experts: int | None
    n_shared_experts: int
    num_experts_per_tok: int | None
    moe_intermediate_size: int | None
    first_k_dense_replace: int
    moe_layer_freq: int
    num_nextn_predict_layers: int
    tie_word_embeddings: bool

    @classmethod
    def parse(cls, cfg: dict) -> "_Shape":
        def need(name):
            if cfg.get(name) is None:
                raise ValueError(f"{name} is required to count FLOPs/params (got {cfg.get(name)!r})")
            return cfg[name]

        attention_type = cfg.get("attention_type", "mla")
        if attention_type not in ("mla", "mha", "gqa", "mqa"):
            raise ValueError(f"attention_type={attention_type!r} is not one of 'mla', 'mha', 'gqa', 'mqa'")
        mla = attention_type == "mla"
        n_routed = cfg.get("n_routed_experts") or None
        return cls(
            hidden_size=need("hidden_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            vocab_size=need("vocab_size"),
            intermediate_size=cfg.get("intermediate_size") or 0,
            attention_type=attention_type,
            q_lora_rank=cfg.get("q_lora_rank") or None,
            kv_lora_rank=need("kv_lora_rank") if mla else None,
            qk_nope_head_dim=need("qk_nope_head_dim") if mla else None,
            qk_rope_head_dim=need("qk_rope_head_dim") if mla else None,
            v_head_dim=need("v_head_dim") if mla else None,
            num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            n_routed_experts=n_routed,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=need("num_experts_per_tok") if n_routed else None,
            moe_intermediate_size=need("moe_intermediate_size") if n_routed else None,
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            num_nextn_predict_layers=cfg.get("num_nextn_predict_layers") or 0,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def is_moe(self, layer: int) -> bool:
        # HF DeepseekV2/V3: MoE iff layer >= first_k_dense_replace and layer % moe_layer_freq == 0.
        return bool(self.n_routed_experts) and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def qk_dim(self) -> int:
        """Per-head query/key width (MLA: nope + rope parts)."""
        if self.attention_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.attention_type == "mla" else self.qk_dim

    @property
    def attention_matmul_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.attention_type == "mla":
            if self.q_lora_rank:
                q = d * self.q_lora_rank + self.q_lora_rank * h * self.qk_dim
            else:
                q = d * h * self.qk_dim
            kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * h * (
                self.qk_nope_head_dim + self.v_head_dim
            )
            return q + kv + h * self.v_dim * d
        kv_heads = {"mha": h, "mqa": 1, "gqa": self.num_key_value_heads or h}[self.attention_type]
        return d * h * self.qk_dim + 2 * d * kv_heads * self.qk_dim + h * self.qk_dim * d

    @property
    def attention_norm_params(self) -> int:
        """MLA's q_a_layernorm and kv_a_layernorm, plus the block's two RMSNorms."""
        mla = (self.q_lora_rank or 0) + self.kv_lora_rank if self.attention_type == "mla" else 0
        return mla + 2 * self.hidden_size

    def expert_params(self, n_experts: int) -> int:
        return n_experts * 3 * self.hidden_size * self.moe_intermediate_size  # gate, up, down


def _layer_flops(s: _Shape, layer: int, seq_len: int) -> tuple[int, int, int, int]:
    """(attention_proj, attention_scores, mlp, router) training FLOPs/token of one decoder layer."""
    attn = _TRAIN * s.attention_matmul_params
    scores = _TRAIN * s.num_attention_heads * (s.qk_dim + s.v_dim) * seq_len
    if s.is_moe(layer):
        mlp = _TRAIN * s.expert_params(s.num_experts_per_tok + s.n_shared_experts)
        router = _TRAIN * s.hidden_size * s.n_routed_experts
    else:
        mlp, router = _TRAIN * 3 * s.hidden_size * s.intermediate_size, 0
    return attn, scores, mlp, router


def training_flops_per_token(seq_len: int, **cfg) -> FlopsPerToken:
    """Training FLOPs per token of a DeepSeek dense/MoE model with MLA/MHA/GQA/MQA attention.

    cfg holds HF DeepseekV3Config shape fields (hidden_size, num_hidden_layers, num_attention_heads,
    vocab_size, intermediate_size, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
    v_head_dim, n_routed_experts, n_shared_experts, num_experts_per_tok, moe_intermediate_size,
    first_k_dense_replace, moe_layer_freq, num_nextn_predict_layers) plus attention_type
    ("mla" default; "mha"/"gqa"/"mqa" use num_key_value_heads and head_dim). Other keys are ignored.
    A dense MHA model with SwiGLU width 8/3·d reproduces DeepSeek LLM's M exactly.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive number of tokens")
    s = _Shape.parse(cfg)
    parts = [_layer_flops(s, i, seq_len) for i in range(s.num_hidden_layers)]
    attn, scores, mlp, router = (sum(p[k] for p in parts) for k in range(4))
    lm_head = _TRAIN * s.hidden_size * s.vocab_size
    # Each MTP module: eh_proj [2d → d], one decoder layer (built like the last main layer), the shared head.
    mtp_layer = sum(_layer_flops(s, s.num_hidden_layers, seq_len))
    mtp = s.num_nextn_predict_layers * (_TRAIN * 2 * s.hidden_size**2 + mtp_layer + lm_head)
    return FlopsPerToken(attn, scores, mlp, router, lm_head, mtp)


def count_params(**cfg) -> ParamCounts:
    """Total and per-token activated parameters of the main model from the same shape fields.

    Activated excludes the embedding table (a lookup, not a matmul), which is the convention that
    reproduces the papers' figures: V3 671B/37B, V2 236B/21B, V2-Lite 15.7B/2.4B. The MoE
    e_score_correction_bias (n_routed_experts per layer) is a buffer-like statistic and not counted.
    """
    s = _Shape.parse(cfg)
    d = s.hidden_size
    total = activated = d  # final norm
    for i in range(s.num_hidden_layers):
        attn = s.attention_matmul_params + s.attention_norm_params
        if s.is_moe(i):
            shared, router = s.expert_params(s.n_shared_experts), d * s.n_routed_experts
            total += attn + router + shared + s.expert_params(s.n_routed_experts)
            activated += attn + router + shared + s.expert_params(s.num_experts_per_tok)
        else:
            total += attn + 3 * d * s.intermediate_size
            activated += attn + 3 * d * s.intermediate_size
    embedding = s.vocab_size * d
    head = 0 if s.tie_word_embeddings else embedding
    # The lm_head matmul is activated even when its weight is the (tied) embedding table.
    return ParamCounts(total=total + embedding + head, activated=activated + embedding, embedding=embedding)
