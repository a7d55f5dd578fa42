"""Checkpoint I/O: FP8 (official layout), sharding, clear errors; config.json compatibility."""
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.interop.hf import (
    CheckpointError,
    load_pretrained,
    load_weights,
    save_pretrained,
    to_hf_state_dict,
)
from nanoseek.quant.fp8 import dequantize_weight_blockwise, quantize_weight_blockwise

# Widths that are not multiples of 128, so ragged edge blocks are exercised.
FP8_SHAPES = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, kv_lora_rank=144,
                  q_lora_rank=176, num_hidden_layers=2)


def _official_fp8_checkpoint(model, path):
    """Write DeepSeek-V3's released FP8 layout by hand: E4M3 weights + float32 weight_scale_inv per
    128x128 block for the decoder's projections; everything else in bf16."""
    tensors, reference = {}, {}
    for key, t in to_hf_state_dict(model).items():
        if t.dim() == 2 and key.startswith("model.layers.") and key.endswith("_proj.weight") and "eh_proj" not in key:
            rows, cols = t.shape
            nr, nc = -(-rows // 128), -(-cols // 128)
            scale = torch.empty(nr, nc)
            q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
            for i in range(nr):
                for j in range(nc):
                    block = t[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                    scale[i, j] = block.abs().max() / 448.0
                    q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j]).to(torch.float8_e4m3fn)
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            deq = torch.empty(rows, cols)
            for i in range(rows):  # the format's definition, element by element per row of blocks
                deq[i] = q[i].float() * scale[i // 128].repeat_interleave(128)[:cols]
            reference[key] = deq
        else:
            tensors[key] = t.to(torch.bfloat16)
            reference[key] = tensors[key].float()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return reference


def test_fp8_checkpoint_reproduces_dequantized_weights_exactly(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", **FP8_SHAPES))
    reference = _official_fp8_checkpoint(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config.quantization_config is None
    got = to_hf_state_dict(loaded)
    n_fp8 = 0
    for key, ref in reference.items():
        if key.endswith("_scale_inv"):
            continue
        assert torch.equal(got[key], ref), key
        n_fp8 += key.endswith("_proj.weight") and "eh_proj" not in key
    assert n_fp8 > 20


def test_fp8_save_roundtrip(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", **FP8_SHAPES)).eval()
    save_pretrained(model, tmp_path, fp8=True)
    raw = load_file(tmp_path / "model.safetensors")
    assert raw["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (2, 2)
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn  # as V3 ships it
    assert raw["model.embed_tokens.weight"].dtype == torch.float32
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    assert (a - b).abs().max() > 0  # E4M3 rounding is there ...
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98  # ... and small (random weights)
    w = model.model.layers[0].self_attn.q_a_proj.weight
    w_loaded = loaded.model.layers[0].self_attn.q_a_proj.weight
    assert torch.equal(w_loaded, dequantize_weight_blockwise(*quantize_weight_blockwise(w)))


def test_sharded_checkpoint_with_index(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3")).eval()
    save_pretrained(model, tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert "model.layers.3.enorm.weight" in index["weight_map"]  # MTP as layer num_hidden_layers
    loaded = load_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    save_pretrained(model, tmp_path)  # re-saving unsharded removes the stale shards and index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_checkpoint_errors_name_the_problem(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))
    save_pretrained(model, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nope")

    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "q_b_proj" not in k}, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*q_b_proj"):
        load_pretrained(tmp_path / "missing")

    save_file({**tensors, "model.layers.0.extra.weight": torch.zeros(1)}, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        load_pretrained(tmp_path / "missing")

    bad = dict(tensors)
    bad["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, tmp_path / "missing" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight has shape \(3, 3\)"):
        load_pretrained(tmp_path / "missing")

    for dtype in (torch.int64, torch.int8, torch.bool):  # were cast to float silently: a different model
        bad = {**tensors, "model.embed_tokens.weight": tensors["model.embed_tokens.weight"].to(dtype)}
        save_file(bad, tmp_path / "missing" / "model.safetensors")
        with pytest.raises(CheckpointError, match=f"model.safetensors: model.embed_tokens.weight is {dtype}, "
                                                  "not floating point"):
            load_pretrained(tmp_path / "missing")

    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "missing" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_pretrained(tmp_path / "missing")

    os.remove(tmp_path / "missing" / "model.safetensors")
    (tmp_path / "missing" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*pickle"):
        load_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("case", ["outside", "absolute", "fifo", "no_weight_map", "not_json"])
def test_unsafe_shard_indexes_are_refused(tmp_path, seed, case):
    """A shard index may only name regular files inside its directory (not ../x, not /abs, not a FIFO, which
    would block the reader), and must have a weight_map: each refused with an error naming it."""
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))
    save_pretrained(model, tmp_path / "m", max_shard_size="200KB")
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, first = next(iter(index["weight_map"].items()))
    if case == "outside":
        (tmp_path / "x.safetensors").write_bytes((tmp_path / "m" / first).read_bytes())
        index["weight_map"][key] = "../x.safetensors"
        expected = "'../x.safetensors', which is not a file name in"
    elif case == "absolute":
        index["weight_map"][key] = str(tmp_path / "m" / first)
        expected = "which is not a file name in"
    elif case == "fifo":
        os.mkfifo(tmp_path / "m" / "pipe.safetensors")
        index["weight_map"][key] = "pipe.safetensors"
        expected = "pipe.safetensors is not a regular file"
    elif case == "no_weight_map":
        index = {"metadata": {}}
        expected = "not a safetensors index with a weight_map"
    else:
        index = None
        expected = "not a safetensors index"
    index_path.write_text("{oops" if index is None else json.dumps(index))
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(tmp_path / "m")


def test_atomic_save_leaves_no_temp_files_and_follows_the_umask(tmp_path, seed):
    """No temp file is left, and the files get the umask's permissions (not the temp files' 0600), so another
    user or a serving container can read a saved model."""
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-dense"))
    old = os.umask(0o022)
    try:
        save_pretrained(model, tmp_path)
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        p.name: "0o644" for p in tmp_path.iterdir()}


# ---------------------------------------------------------------- config.json compatibility
def test_transformers_configs_load_unchanged():
    transformers = pytest.importorskip("transformers")
    v3 = ModelConfig(**transformers.DeepseekV3Config().to_dict())
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.q_lora_rank) == (256, 8, 1536)
    v2 = ModelConfig(**transformers.DeepseekV2Config(n_routed_experts=64, num_experts_per_tok=6).to_dict())
    assert v2.scoring_func == "softmax" and v2.topk_method == "greedy" and not v2.norm_topk_prob


def test_official_v3_config_json_loads():
    """DeepSeek-V3's own config.json style: legacy rope_scaling, noaux_tc, scoring_func, quantization."""
    official = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    cfg = ModelConfig(**official)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_theta == 10000
    assert abs(cfg.softmax_scale / (192 ** -0.5) - (0.1 * __import__("math").log(40) + 1) ** 2) < 1e-12
    assert ModelConfig(**cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change,field,allowed", [
    (dict(n_routed_experts=10), "n_routed_experts", "divisible by n_group"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim", "even"),
    (dict(topk_group=5), "topk_group", "1..n_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok", "kept groups/devices hold only 4"),
    (dict(scoring_func="relu"), "scoring_func", "sigmoid, softmax"),
    (dict(topk_method="random"), "topk_method", "greedy"),
    (dict(attention_type="linear"), "attention_type", "mla, mha"),
    (dict(attention_type="gqa", num_key_value_heads=3), "num_key_value_heads", "divide"),
    (dict(topk_devices=3, ep_size=2), "topk_devices", "1..ep_size"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type", "default, yarn"),
])
def test_invalid_config_names_field_value_and_allowed(change, field, allowed):
    with pytest.raises(ValueError) as e:
        ModelConfig.preset("tiny-v3", **change)
    msg = str(e.value)
    assert field in msg and allowed in msg


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'tiny-v9'.*tiny-v3"):
        ModelConfig.preset("tiny-v9")


def test_fp8_checkpoint_errors_name_the_problem(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", **FP8_SHAPES))
    save_pretrained(model, tmp_path / "ok", fp8=True)
    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    key = "model.layers.0.self_attn.q_a_proj.weight"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    for change, needle in [
        ({key: None}, f"{key}_scale_inv has no matching {key}"),
        ({key + "_scale_inv": None}, f"{key} is FP8 but has no weight_scale_inv"),
        ({key + "_scale_inv": torch.ones(1, 2)}, r"has shape \(1, 2\), expected \(2, 2\) for 128x128 blocks"),
        ({"model.layers.1.mlp.experts.5.up_proj.weight": None, "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv":
          None}, r"experts \[5\] are missing their up_proj"),
    ]:
        bad = {k: v for k, v in {**tensors, **change}.items() if v is not None}
        save_file(bad, tmp_path / "bad" / "model.safetensors")
        with pytest.raises(CheckpointError, match=needle):
            load_pretrained(tmp_path / "bad")
    save_file({key: tensors[key]}, tmp_path / "bad" / "model-2.safetensors")  # a key in two files
    with pytest.raises(CheckpointError, match=f"{key} is in both .*model-2.safetensors and .*/model.safetensors"):
        load_pretrained(tmp_path / "bad")


def test_tied_embeddings_and_loading_into_a_model(tmp_path, seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", tie_word_embeddings=True)).eval()
    save_pretrained(model, tmp_path, fp8=True, max_shard_size="100KB")
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    again = nanoseek.DeepSeekForCausalLM(model.config)
    load_weights(again, tmp_path)  # in place, into the model's own (fp32) tensors
    for (k, a), (_, b) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    again.model.layers[0].self_attn.kv_b_proj = torch.nn.Linear(32, 3, bias=False)
    with pytest.raises(CheckpointError, match="kv_b_proj.weight has shape .* the model implies"):
        load_weights(again, tmp_path)


def test_a_full_disk_while_saving_is_a_clear_error_and_loses_nothing(tmp_path, seed, monkeypatch):
    from nanoseek.train import checkpoint as ckpt

    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-dense"))
    opt = torch.optim.AdamW(model.parameters())
    first = ckpt.save_checkpoint(tmp_path, 1, model, opt, {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*step-00000002: No space left on device"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {})
    assert ckpt.list_checkpoints(tmp_path) == [first] and ckpt.verify_checkpoint(first)["step"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]


def test_v2_layout_with_routing_biases_is_refused_for_transformers_but_round_trips_in_nanoseek(tmp_path, seed):
    """transformers' DeepseekV2 router has no bias: a V2-layout model trained with aux-loss-free balancing would
    load there as another model. The HF export refuses it, naming the cause and the fix; a training run's model/
    (export_model) keeps the biases and nanoseek reloads it exactly."""
    from nanoseek.interop.cli import convert
    from nanoseek.train.checkpoint import export_model

    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v2")).eval()
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias.copy_(torch.randn(model.config.n_routed_experts))
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias is non-zero .*DeepseekV2.*"
                                              r"bias_update_speed=0.*deepseek_v3"):
        save_pretrained(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.warns(UserWarning, match="transformers"):
        export_model(model, None, tmp_path / "run" / "model")
    again = load_pretrained(tmp_path / "run" / "model")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="e_score_correction_bias is non-zero"):
        convert(str(tmp_path / "run" / "model"), str(tmp_path / "converted"), "float32")
    # Without biases (bias_update_speed=0) the V2 layout exports as before.
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias.zero_()
    save_pretrained(model, tmp_path / "plain")
