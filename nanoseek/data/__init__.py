"""Data for pretraining and post-training: tokenizer, chat format, text corpora, token shards, loaders.

    tok = train_tokenizer(["stdlib"], 4096, "runs/tok", max_bytes=20_000_000)
    prepare(["stdlib"], "runs/tok", "runs/data", val_fraction=0.01, seed=0)
    loader = PackedLoader("runs/data", batch_size=8, seq_len=256, extra=1, seed=0)   # extra = MTP depth
    batch = next(loader)                                                            # LongTensor [8, 258]
"""
from nanoseek.data.chat import CHAT_TEMPLATE, SPECIAL_TOKENS, render_chat
from nanoseek.data.corpus import STDLIB, iter_documents, stdlib_files
from nanoseek.data.loader import PackedLoader, ValLoader
from nanoseek.data.shards import TokenSplit, check_vocab, load_metadata, prepare
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer, train_tokenizer_from_texts

__all__ = [
    "CHAT_TEMPLATE", "SPECIAL_TOKENS", "STDLIB", "PackedLoader", "TokenSplit", "Tokenizer", "ValLoader",
    "check_vocab", "iter_documents", "load_metadata", "load_tokenizer", "prepare", "render_chat", "stdlib_files",
    "train_tokenizer", "train_tokenizer_from_texts",
]
