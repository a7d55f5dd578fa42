"""`nanoseek demo`: the smallest real end-to-end run of what exists today.

Trains a tokenizer on Python's standard library, builds a DeepSeek-V3-style model with that
vocabulary (MLA, DeepSeekMoE with shared experts and a routing bias, MTP, YaRN), saves it in the
Hugging Face layout, reloads it (and an FP8 block-quantized copy), generates with the latent KV
cache, and reports what it did. The model is untrained, so its text is noise.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def run(out: str = "runs/demo", seed: int = 0) -> dict:
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer
    from nanoseek.infer.cache import KVCache
    from nanoseek.infer.generate import generate
    from nanoseek.interop.cli import convert
    from nanoseek.model.transformer import DeepSeekForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    model_dir, fp8_dir = os.path.join(out, "model"), os.path.join(out, "model-fp8")
    print("1/5 training a 1024-token byte-level BPE on 2 MB of the standard library ...")
    tok = train_tokenizer("stdlib", 1024, os.path.join(out, "tokenizer"), max_bytes=2_000_000, seed=seed, progress=False)

    cfg = ModelConfig.preset("tiny-v3", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id)
    model = DeepSeekForCausalLM(cfg).eval()
    print(f"2/5 built a DeepSeek-V3-style model: {model.num_parameters(mtp=True):,} parameters, "
          f"{model.num_parameters(active=True):,} active per token (MLA, {cfg.n_routed_experts} routed + "
          f"{cfg.n_shared_experts} shared experts, top-{cfg.num_experts_per_tok}, MTP depth {cfg.num_nextn_predict_layers})")

    model.save_pretrained(model_dir)
    tok.save(model_dir)
    reloaded = DeepSeekForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("def main(argv=None):\n    return")])
    with torch.no_grad():
        same = torch.equal(model(ids).logits, reloaded(ids).logits)
    print(f"3/5 saved to {model_dir} (config.json + model.safetensors + tokenizer) and reloaded: "
          f"logits {'identical' if same else 'DIFFERENT'}")

    convert(model_dir, fp8_dir, dtype="fp8")
    fp8 = DeepSeekForCausalLM.from_pretrained(fp8_dir)
    with torch.no_grad():
        fp8_err = (fp8(ids).logits - model(ids).logits).abs().max().item()
    print(f"4/5 wrote an FP8 (E4M3, 128x128 block scales) copy to {fp8_dir}; max |logit error| {fp8_err:.4f}")

    prompt = tok.encode("import os\n")
    new = generate(reloaded, [prompt], max_new_tokens=16, temperature=0.0, stop_tokens=[])[0]
    cache = KVCache(cfg.num_hidden_layers, 1, 4)
    with torch.no_grad():
        reloaded(torch.tensor([prompt[:1]]), cache=cache)
    mla = cache.bytes_per_token_per_layer()
    mha = 2 * cfg.num_attention_heads * cfg.qk_head_dim * 4
    print(f"5/5 greedy generation over the MLA latent cache ({mla} bytes/token/layer vs {mha} for MHA K/V, "
          f"-{100 * (1 - mla / mha):.0f}%): {tok.decode(new)!r}")
    if not same:
        raise RuntimeError("reloaded checkpoint gave different logits")
    print(f"done in {time.time() - t0:.1f}s; the model is untrained (pretraining lands with `nanoseek pretrain`).")
    return {"reload_identical": same, "fp8_max_logit_error": fp8_err, "generated": new}


def _run(args: argparse.Namespace) -> None:
    run(args.out, args.seed)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo",
                              description="Build, save, reload, quantize and sample a DeepSeek-V3-style model.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
