"""`nanoseek convert`: rewrite a checkpoint (dtype, FP8 block quantization, sharding)."""
from __future__ import annotations

import argparse
import os
import shutil

import torch

from nanoseek.interop.hf import load_pretrained, save_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def convert(src: str, dst: str, dtype: str = "bfloat16", max_shard_size: str = "5GB") -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert writes a new directory: --out must differ from the source")
    fp8 = dtype == "fp8"
    model = load_pretrained(src, dtype=torch.float32 if fp8 else DTYPES[dtype], progress="convert: reading")
    save_pretrained(model, dst, max_shard_size=max_shard_size, dtype=torch.bfloat16 if fp8 else None, fp8=fp8,
                    progress="convert: writing")
    for name in TOKENIZER_FILES:  # a model directory carries its tokenizer
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _run(args: argparse.Namespace) -> None:
    convert(args.model, args.out, args.dtype, args.max_shard_size)
    print(f"wrote {args.dtype} checkpoint to {args.out}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint: dtype (e.g. FP8 -> bf16), FP8 block quantization, sharding",
        description="Load a DeepseekV2/V3 (or DeepSeek-LLM) checkpoint, FP8 block-scaled ones included, and "
                    "write it in the Hugging Face layout with the chosen precision.")
    p.add_argument("model", metavar="SRC", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", choices=[*DTYPES, "fp8"], default="bfloat16",
                   help="precision of the output; fp8 writes E4M3 weights with 128x128 block scales (default bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 500MB (default 5GB)")
    p.set_defaults(func=_run)
