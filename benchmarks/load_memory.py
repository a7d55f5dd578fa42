"""Peak memory of loading a checkpoint: a generated FP8 one loaded with keep_fp8, and a generated bf16 one.

Each checkpoint (≥ --size-gb) is written shard by shard in the Hugging Face layout with random weights — E4M3 and
128x128-block scales for the FP8 one — for a model of the preset's shapes with as many layers as reach the size,
never as a whole model in memory. Each is then loaded in a fresh process: the peak resident memory during
`load_pretrained` (VmHWM, reset right before it) minus the resident memory just before it (python + torch,
with the modules torch imports on first use of the meta device: a fixed ~80 MB), over the checkpoint's size on
disk; the target is ≤ 1.3x. Finally the FP8 checkpoint's greedy tokens with
keep_fp8 are compared with those of the same checkpoint loaded dequantized (same dtype). The checkpoints live
in a temporary directory (--dir, default /tmp) that is deleted at the end. Exit status 1 when a check fails.

    .venv/bin/python benchmarks/load_memory.py        # DeepSeek-V2-Lite's shapes, 3 / 2 layers: ~2.1 GB each
    .venv/bin/python benchmarks/load_memory.py --preset small-v3 --set hidden_size=512 --size-gb 0.1 --shard-mb 30
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

import torch

from nanoseek.config import ModelConfig
from nanoseek.infer.generate import generate
from nanoseek.interop.hf import (
    FP8_QUANTIZATION_CONFIG,
    is_fp8_eligible,
    load_pretrained,
    shard_layout,
    to_hf_state_dict,
    write_checkpoint,
)
from nanoseek.model.transformer import DeepSeekForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TARGET = 1.3


# ---------------------------------------------------------------------------- writing a checkpoint
def layout_of(cfg: ModelConfig, fp8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (shape, dtype) of every tensor a `cfg` model's checkpoint holds (bf16, or FP8 with
    float32 scales for the weights DeepSeek-V3 quantizes), from a model on the meta device; without routing
    biases (optional: all-zero ones are not written)."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM(cfg)
    state = {k: t for k, t in model.state_dict().items() if not k.endswith("e_score_correction_bias")}
    out = {}
    for key, t in to_hf_state_dict(model, state).items():
        if fp8 and is_fp8_eligible(key, t):
            out[key + "_scale_inv"] = (tuple(-(-d // 128) for d in t.shape), torch.float32)
            out[key] = (tuple(t.shape), torch.float8_e4m3fn)
        else:
            out[key] = (tuple(t.shape), torch.bfloat16)
    return out


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A deterministic random tensor per key: norms 1, weights ~N(0, 0.02) (for FP8: E4M3 values ~N(0, 64)
    times block scales ~0.02/64)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if key.endswith("_scale_inv"):
        return (0.5 + torch.rand(shape, generator=g)) * (0.02 / 64)
    if dtype == torch.float8_e4m3fn:
        return (torch.randn(shape, generator=g) * 64).clamp_(-448, 448).to(dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_random_checkpoint(path: str, cfg: ModelConfig, fp8: bool, shard_mb: int) -> None:
    tensors = layout_of(cfg, fp8)
    sizes = {k: torch.Size(shape).numel() * dtype.itemsize for k, (shape, dtype) in tensors.items()}
    layout = shard_layout(sizes, shard_mb * 2**20)
    cfg = cfg.replace(quantization_config=FP8_QUANTIZATION_CONFIG) if fp8 else cfg
    write_checkpoint(path, layout, lambda keys: {k: random_tensor(k, *tensors[k]) for k in keys}, cfg)


def sized_config(args, fp8: bool) -> ModelConfig:
    """The preset (with --set overrides) with the fewest layers whose checkpoint reaches --size-gb."""
    base = ModelConfig.preset(args.preset, **dict(args.set))
    for layers in range(1, 1000):
        cfg = base.replace(num_hidden_layers=layers)
        size = sum(torch.Size(s).numel() * d.itemsize for s, d in layout_of(cfg, fp8).values())
        if size >= args.size_gb * 1e9:
            return cfg
    raise ValueError(f"{args.preset} does not reach {args.size_gb} GB with 1000 layers")


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# ---------------------------------------------------------------------------- measuring (in a child process)
def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(path: str, dtype: torch.dtype, keep_fp8: bool) -> dict:
    """Resident memory (MB) before and at the peak of load_pretrained, in this process."""
    with torch.device("meta"):  # the baseline includes the ~80 MB of modules torch imports for the meta device
        DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak is the loading's alone
    t = time.perf_counter()
    model = load_pretrained(path, dtype=dtype, keep_fp8=keep_fp8)
    seconds = time.perf_counter() - t
    return {"before_mb": before, "peak_mb": status_mb("VmHWM"), "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def tokens(path: str, dtype: torch.dtype, keep_fp8: bool, new_tokens: int, prompt_tokens: int) -> dict:
    """Greedy tokens after a random prompt, and the resident memory (MB) generating them took beyond the
    loaded model's (dequantized weights in flight, activations, KV cache)."""
    model = load_pretrained(path, dtype=dtype, keep_fp8=keep_fp8)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    loaded = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    # eager: a compile's own memory is not the decoding's (and FP8-stored weights are not compiled)
    out = generate(model, [prompt.tolist()], max_new_tokens=new_tokens, temperature=0.0, compile=False)[0]
    return {"tokens": out, "generate_extra_mb": status_mb("VmHWM") - loaded, "seconds": time.perf_counter() - t}


def child(args, mode: str, path: str, keep_fp8: bool) -> dict:
    """Run this script's --child mode in a fresh process; its JSON answer."""
    argv = [sys.executable, __file__, "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
            "--prompt-tokens", str(args.prompt_tokens), "--child", mode, path, str(int(keep_fp8))]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite", help="the shapes (layers are added to reach the size)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config field",
                    type=lambda s: (s.split("=", 1)[0], json.loads(s.split("=", 1)[1])))
    ap.add_argument("--size-gb", type=float, default=2.0, help="minimum size of each checkpoint (1e9 bytes)")
    ap.add_argument("--shard-mb", type=int, default=500, help="maximum shard size (MiB)")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the loaded model's dtype")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared (0: skip the comparison)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="random prompt of the comparison")
    ap.add_argument("--dir", default=None, help="where the temporary checkpoints go (default: the system's /tmp)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "KEEP_FP8"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dtype = DTYPES[args.dtype]
    if args.child:
        mode, path, keep_fp8 = args.child
        keep_fp8 = keep_fp8 == "1"
        print(json.dumps(measure(path, dtype, keep_fp8) if mode == "measure" else
                         tokens(path, dtype, keep_fp8, args.new_tokens, args.prompt_tokens)))
        return 0

    results, ok = {}, True
    for kind, fp8 in (("fp8", True), ("bf16", False)):
        cfg = sized_config(args, fp8)
        with tempfile.TemporaryDirectory(dir=args.dir, prefix=f"nanoseek-load-{kind}-") as path:
            t = time.perf_counter()
            write_random_checkpoint(path, cfg, fp8, args.shard_mb)
            size = dir_size(path)
            shards = sum(f.endswith(".safetensors") for f in os.listdir(path))
            print(f"{kind}: wrote {size / 1e9:.2f} GB in {shards} shards ({args.preset}, {cfg.num_hidden_layers} "
                  f"layers) in {time.perf_counter() - t:.0f}s", flush=True)
            m = child(args, "measure", path, fp8)
            ratio = (m["peak_mb"] - m["before_mb"]) * 2**20 / size
            passed = ratio <= TARGET
            ok &= passed
            r = results[kind] = {"checkpoint_bytes": size, "shards": shards, "layers": cfg.num_hidden_layers,
                                 "keep_fp8": fp8, "dtype": args.dtype, **m, "ratio": ratio, "ok": passed}
            print(f"{kind}: load_pretrained(dtype={args.dtype}{', keep_fp8=True' if fp8 else ''}) in "
                  f"{m['seconds']:.1f}s: RSS {m['before_mb']:.0f} MB before, peak {m['peak_mb']:.0f} MB: "
                  f"{ratio:.3f}x the checkpoint ({'ok' if passed else 'FAIL'}: target <= {TARGET}x)", flush=True)
            if fp8 and args.new_tokens:
                kept, deq = child(args, "tokens", path, True), child(args, "tokens", path, False)
                match = kept["tokens"] == deq["tokens"]
                r.update(greedy_match=match, generate_keep_fp8=kept, generate_dequantized=deq)
                ok &= match
                print(f"fp8: {args.new_tokens} greedy tokens after a {args.prompt_tokens}-token prompt, keep_fp8 vs "
                      f"dequantized: {'identical' if match else 'DIFFERENT'} ({kept['tokens']} / {deq['tokens']}); "
                      f"generating took {kept['generate_extra_mb']:.0f} / {deq['generate_extra_mb']:.0f} MB beyond "
                      f"the loaded model, {kept['seconds']:.1f} / {deq['seconds']:.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
