"""A token dataset from the standard library, as the pretraining tests build one."""
from pathlib import Path

from nanoseek.data import prepare, train_tokenizer


def stdlib_dataset(root: Path, max_bytes: int, val_fraction: float) -> Path:
    """`max_bytes` of the standard library tokenized by a 512-token BPE into root/data, `val_fraction` of the
    documents held out."""
    tok = train_tokenizer("stdlib", 512, root / "tok", max_bytes=max_bytes, seed=0, progress=False)
    prepare("stdlib", tok, root / "data", val_fraction=val_fraction, max_bytes=max_bytes, seed=0, progress=False)
    return root / "data"
