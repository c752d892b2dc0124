"""GGUF export: presets reproduce ggml's Q8_0 / Q4_0 blocks, the writer stores the trained codes
as they are, and llama.cpp runs the file (skipped without llama-cpp-python)."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

from qat import QATConfigError, convert, prepare  # noqa: E402
from qat.export.gguf import export_gguf, gguf_blocks  # noqa: E402

from .bert_fixtures import SENTENCES, tiny_bert  # noqa: E402

T = gguf.GGMLQuantizationType


def _layer(preset, w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return prepare(nn.Sequential(lin), preset)[0]


def _pow2_blocks(rows, blocks, qmax, ties, seed=0):
    """Blocks whose ggml scale is a power of two (so float16 rounding changes nothing), with the
    extreme element and, if asked, exact rounding ties (k + 0.5) * d."""
    g = torch.Generator().manual_seed(seed)
    d = 2.0 ** torch.randint(-8, -2, (rows, blocks, 1), generator=g).float()
    v = torch.rand(rows, blocks, 32, generator=g) * 2 * qmax - qmax
    if ties:
        v = torch.floor(v) + 0.5
    v = v.clamp(-qmax + 0.5, qmax - 0.5)
    v[..., 5] = qmax  # the block's extreme, positive in Q4_0 so that d < 0
    return (v * d).reshape(rows, blocks * 32)


@pytest.mark.parametrize("ties", [False, True])
def test_q8_0_preset_equals_ggml_reference(ties):
    w = _pow2_blocks(8, 4, 127, ties)
    layer = _layer("gguf_q8_0", w)
    ref = dequantize(quantize(w.numpy(), T.Q8_0), T.Q8_0)
    np.testing.assert_array_equal(layer.quantized_weight().detach().numpy(), ref)


@pytest.mark.parametrize("ties", [False, True])
def test_q4_0_preset_equals_ggml_reference(ties):
    w = _pow2_blocks(8, 4, 8, ties)  # extreme +8 d: ggml's d = max / -8 is negative
    layer = _layer("gguf_q4_0", w)
    ref = dequantize(quantize(w.numpy(), T.Q4_0), T.Q4_0)
    np.testing.assert_array_equal(layer.quantized_weight().detach().numpy(), ref)
    assert (layer.weight_quantizer.scale < 0).any()


@pytest.mark.parametrize("preset,qtype", [("gguf_q8_0", "Q8_0"), ("gguf_q4_0", "Q4_0")])
def test_blocks_hold_the_trained_weights_exactly(preset, qtype):
    torch.manual_seed(0)
    layer = _layer(preset, torch.randn(16, 128) * torch.rand(16, 1))
    fq_weight = layer.quantized_weight().detach()
    int_layer = convert(nn.Sequential(layer).eval())[0]
    blocks, got = gguf_blocks(int_layer)
    assert got == qtype and blocks.dtype == np.uint8
    assert blocks.shape == (16, 4 * (34 if qtype == "Q8_0" else 18))
    np.testing.assert_array_equal(dequantize(blocks, getattr(T, qtype)), fq_weight.numpy())


@pytest.mark.parametrize("preset", ["gguf_q8_0", "gguf_q4_0"])
def test_bert_file_layout(tmp_path, preset):
    model, _, tokdir = tiny_bert()
    prepare(model, preset)
    path = export_gguf(convert(model), tmp_path / "m.gguf", tokenizer_dir=tokdir)
    r = gguf.GGUFReader(path)
    kv = {f.name: f for f in r.fields.values()}
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "bert"
    assert bytes(kv["tokenizer.ggml.model"].parts[-1]).decode() == "bert"
    assert int(kv["bert.pooling_type"].parts[-1][0]) == int(gguf.PoolingType.MEAN)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    want = "Q8_0" if preset == "gguf_q8_0" else "Q4_0"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == want
    assert types["token_embd.weight"] == types["blk.0.attn_output_norm.weight"] == "F32"
    assert not any(n.startswith("pooler") for n in types)


def test_errors(tmp_path):
    with pytest.raises(QATConfigError, match="BERT"):
        export_gguf(nn.Linear(4, 4), tmp_path / "m.gguf")
    model, _, tokdir = tiny_bert()
    prepare(model, "w8a8")
    model(torch.randint(0, 100, (2, 5)))
    with pytest.raises(QATConfigError, match="group_size 32"):
        export_gguf(convert(model), tmp_path / "m.gguf", tokenizer_dir=tokdir)
    with pytest.raises(QATConfigError, match="float_to"):
        export_gguf(tiny_bert()[0], tmp_path / "m.gguf", tokenizer_dir=tokdir, float_to="q5_k")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("preset", ["gguf_q8_0", "gguf_q4_0"])
def test_llama_cpp_runs_the_file(tmp_path, preset):
    from qat.export.gguf import llama_embed
    from qat.recipes.minilm import embed

    model, tok, tokdir = tiny_bert()
    prepare(model, preset)
    model.eval()
    sentences = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the announcement.",
                 "A quick brown fox jumps over the lazy dog", "Rain is expected across the region tonight."]
    ours = embed(model, tok, sentences, max_length=128)
    path = export_gguf(convert(model), tmp_path / "m.gguf", tokenizer_dir=tokdir)
    theirs = llama_embed(path, sentences)
    cos = (ours * theirs).sum(-1)
    assert cos.min() >= 0.999, cos


# ------------------------------------------------------------------ k-quants (exported prepared, as trained)
def _plan(model, preset):
    """A single-type preset as shipped; a mix as llama.cpp assigns it at the model's depth."""
    from qat.kquants import kquant_mix_plan

    return kquant_mix_plan(model, preset[5:]) if preset.endswith("_m") else preset


@pytest.mark.parametrize("preset", ["gguf_q3_k", "gguf_q4_k_m"] + [pytest.param(p, marks=pytest.mark.slow) for p in (
    "gguf_q2_k", "gguf_q4_k", "gguf_q5_k", "gguf_q6_k", "gguf_q5_k_m")])  # every type: test_kquants.py, fast
def test_kquant_bert_file_holds_the_fake_quantized_weights(tmp_path, preset):
    model, _, tokdir = tiny_bert(hidden=256)  # rows of 256 (attention, ffn_up) and 512 (ffn_down)
    prepare(model, _plan(model, preset))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir)
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    base = preset[5:9].upper()
    types = {n: t.tensor_type.name for n, t in by_name.items()}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == base
    assert types["blk.0.attn_output_norm.weight"] == types["position_embd.weight"] == "F32"
    if preset.endswith("_m"):  # use_more_bits(i, 2): layer 1's attn_v and ffn_down
        assert types["token_embd.weight"] == "Q6_K"  # BERT has no output head: llama.cpp's output type
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == base
        ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{base}_M")
    else:
        assert types["token_embd.weight"] == "F32"
        ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{base}" if base in ("Q2_K", "Q6_K") else f"MOSTLY_{base}_S")
    kv = {f.name: f for f in r.fields.values()}
    assert int(kv["general.file_type"].parts[-1][0]) == int(ftype)
    for gname, mod in (("blk.0.attn_v.weight", model.encoder.layer[0].attention.self.value),
                       ("blk.1.ffn_down.weight", model.encoder.layer[1].output.dense)):
        t = by_name[gname]
        got = dequantize(np.asarray(t.data), t.tensor_type).reshape(mod.weight.shape)
        np.testing.assert_array_equal(got, mod.quantized_weight().detach().numpy())


def test_kquant_export_refuses_affine_fake_quantized_layers(tmp_path):
    model, _, tokdir = tiny_bert()
    prepare(model, "gguf_q4_0")
    with pytest.raises(QATConfigError, match="convert the model first"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("preset", ["gguf_q4_k", "gguf_q4_k_m"])
def test_llama_cpp_runs_the_kquant_file(tmp_path, preset):
    from qat.export.gguf import llama_embed
    from qat.recipes.minilm import embed

    model, tok, tokdir = tiny_bert(hidden=256)
    prepare(model, _plan(model, preset))
    model.eval()
    ours = embed(model, tok, SENTENCES, max_length=128)
    theirs = llama_embed(export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir), SENTENCES)
    cos = (ours * theirs).sum(-1)
    assert cos.min() >= 0.999, cos


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("preset", ["gguf_q4_k_m", "gguf_q2_k"])
def test_llama_cpp_runs_kquant_minilm(tmp_path, preset):
    """all-MiniLM-L6-v2 (rows of 384: llama-quantize's fallback types there, the k-quant in ffn_down)."""
    from qat.export.gguf import llama_embed
    from qat.recipes.minilm import embed, load_minilm, load_sentences

    model, tok = load_minilm()
    tokdir = model.config.name_or_path
    prepare(model, _plan(model, preset))
    model.eval()
    held = load_sentences()[1][:32]
    ours = embed(model, tok, held, max_length=512)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tokdir)
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= types if preset == "gguf_q4_k_m" else {"Q2_K", "Q4_0"} <= types
    cos = (ours * llama_embed(path, held)).sum(-1)
    assert cos.min() >= 0.999, cos
