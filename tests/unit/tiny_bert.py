"""A tiny randomly initialised BERT saved to a folder: the real transformers code path, fast."""

from __future__ import annotations

from pathlib import Path

_WORDS = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789().,:;'&!?-")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
)


def make_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """Write tokenizer + weights of a 1-layer BERT of width ``hidden`` into ``folder``."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast  # type: ignore[attr-defined]
    tokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=len(_WORDS),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    transformers.BertModel(cfg).save_pretrained(folder)
    return folder
