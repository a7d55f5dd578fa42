"""FP8 inference: an FP8 checkpoint kept in FP8 (`load_pretrained(..., keep_fp8=True)`, `--fp8`) computes exactly
what the same checkpoint loaded dequantized computes, holding E4M3 weights and their scales only."""
import pytest
import torch
from infer_fixtures import chat_model_dir
from torch import nn

import nanoseek
from nanoseek.cli import build_parser, main
from nanoseek.config import ModelConfig
from nanoseek.interop.hf import CheckpointError, load_pretrained, save_pretrained
from nanoseek.model import moe
from nanoseek.model.moe import Experts
from nanoseek.quant.fp8_weights import holds_fp8

# Widths that are not multiples of 128 (ragged edge blocks), an MTP module, several shards.
SHAPES = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, kv_lora_rank=144, q_lora_rank=176,
              num_hidden_layers=3)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", **SHAPES)).eval()
    path = tmp_path_factory.mktemp("fp8")
    save_pretrained(model, path, fp8=True, max_shard_size="400KB")
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_fp8_computes_what_the_dequantized_model_computes(fp8_dir, dtype):
    ref = load_pretrained(fp8_dir, dtype=dtype)
    kept = load_pretrained(fp8_dir, dtype=dtype, keep_fp8=True)
    # every weight the checkpoint holds in FP8 (the decoder blocks' *_proj, MTP's too, and the experts) stays E4M3
    n = 0
    for name, m in ref.named_modules():
        if (isinstance(m, nn.Linear) and name.endswith("_proj") and (name.startswith("model.") or ".block." in name)) \
                or isinstance(m, Experts):
            stored = kept.get_submodule(name)
            assert holds_fp8(stored), name
            for w in stored.parametrizations.values():
                assert w.original.dtype == torch.float8_e4m3fn and not w.original.requires_grad, name
            n += 1
    assert n > 30 and not holds_fp8(kept.lm_head) and not holds_fp8(kept.mtp[0].eh_proj)
    assert kept.model.embed_tokens.weight.dtype == dtype == kept.model.layers[1].mlp.gate.weight.dtype
    assert torch.equal(kept.model.layers[1].mlp.experts.down_proj, ref.model.layers[1].mlp.experts.down_proj)
    # the same logits (MTP's included) ...
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = kept(ids), ref(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])
    # ... and the same greedy tokens through the engine, whose fast paths both models run
    prompts = [ids[0].tolist(), ids[1, :7].tolist(), ids[1, :3].tolist()]
    for speculative in (False, True):
        got = nanoseek.generate(kept, prompts, max_new_tokens=24, temperature=0.0, speculative=speculative)
        assert got == nanoseek.generate(ref, prompts, max_new_tokens=24, temperature=0.0, speculative=speculative)
    # the fast paths dequantize as they go: no dequantized copies kept
    attn, experts = kept.model.layers[0].self_attn, kept.model.layers[1].mlp.experts
    assert type(attn).__name__ == "FastMLA" and type(experts).__mro__[1].__name__ == "FastExperts"
    assert attn._decode_cache.value is None and experts._decode_cache.value is None


def test_keep_fp8_dequantizes_only_the_experts_with_rows(fp8_dir, monkeypatch):
    kept, ref = load_pretrained(fp8_dir, keep_fp8=True), load_pretrained(fp8_dir)
    asked, dequantize = [], moe.dequantize_experts
    monkeypatch.setattr(moe, "dequantize_experts", lambda m, name, index: asked.append(index.tolist()) or
                        dequantize(m, name, index))
    counts = torch.tensor([0, 3, 0, 0, 2, 0, 0, 1])
    x = torch.randn(6, 192)
    with torch.no_grad():
        got = kept.model.layers[1].mlp.experts(x, counts)
        assert torch.equal(got, ref.model.layers[1].mlp.experts(x, counts))
    assert asked == [[1, 4, 7]] * 3


def test_keep_fp8_needs_an_fp8_checkpoint_and_is_not_saved(tmp_path, fp8_dir):
    save_pretrained(nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3")), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="plain is not an FP8 checkpoint"):
        load_pretrained(tmp_path / "plain", keep_fp8=True)
    with pytest.raises(ValueError, match="holds FP8 weights .*without keep_fp8"):
        save_pretrained(load_pretrained(fp8_dir, keep_fp8=True), tmp_path / "again")


def test_fp8_flag_of_generate_chat_and_serve(tmp_path, capsys):
    fp8 = str(tmp_path / "fp8")
    main(["convert", chat_model_dir(), "--out", fp8, "--dtype", "fp8"])
    capsys.readouterr()
    outs = []
    for extra in ([], ["--fp8"]):
        main(["generate", "--model", fp8, "--prompt", "What is 2+2?", "--chat", "--color", "never",
              "--max-new-tokens", "30", "--dtype", "bfloat16", *extra])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 10
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", chat_model_dir(), "--prompt", "hi", "--fp8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not an FP8 checkpoint" in err and err.count("\n") == 1
    for command in ("chat", "serve"):
        assert build_parser().parse_args([command, "--model", fp8, "--fp8"]).fp8

