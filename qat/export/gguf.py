"""GGUF export for llama.cpp: BERT-architecture sentence encoders (e.g. all-MiniLM-L6-v2).

Weights trained with the ``gguf_q8_0`` / ``gguf_q4_0`` presets are written into Q8_0 / Q4_0 blocks
*as trained*: the integer codes and float16 block scales of the converted model go into the file
unchanged, so llama.cpp dequantizes exactly the weights the fake-quantized model used.

Block layouts (ggml, 32 weights a block along a row):

* Q8_0, 34 bytes: ``d`` (float16) then 32 ``int8`` codes; ``w = q * d``.
* Q4_0, 18 bytes: ``d`` (float16) then 16 bytes; byte ``j`` holds code ``j`` in its low nibble and
  code ``j + 16`` in its high nibble, each stored as ``q + 8``; ``w = q * d``.

Any signed, symmetric, per-group-32 weight spec with float16-exact scales maps onto one of them
(up to 4 bits -> Q4_0, 5..8 bits -> Q8_0).

llama.cpp's k-quants (Q2_K .. Q6_K, ``QuantSpec.format``, the ``gguf_q*_k*`` presets and
:func:`qat.kquants.kquant_mix_plan`) have no integer layer: :func:`export_gguf` takes the
*prepared* model and writes each k-quant layer's blocks from :func:`qat.kquants.kquant_blocks`, the
codes and two levels of scales its fake quantization used (256-weight super-blocks along a row).
Weights trained with ``format: mxfp4`` (the ``mxfp4`` / ``gguf_mxfp4`` presets) are written the same
way, prepared, as MXFP4 blocks (17 bytes: the E8M0 scale byte, then 32 E2M1 codes in nibbles, as
Q4_0's) from :func:`mxfp4_blocks`. NVFP4 is not written: ggml's NVFP4 block has E4M3 sub-block scales
but no float32 tensor scale, so the blocks our ``nvfp4`` weights use are not what it stores. Float weights are written as F32 (or quantized with
gguf-py's port of ggml's reference quantizer when ``float_to`` asks: the "float model straight to
Q4_0" baseline). The model metadata and tokenizer follow llama.cpp's ``convert_hf_to_gguf.py`` for
``BertModel``: architecture ``bert``, WordPiece vocabulary as tokenizer model ``bert`` with
llama.cpp's phantom-space token spelling, token types, mean pooling, non-causal attention.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..int_modules import IntModuleMixin
from ..errors import QATConfigError
from ..granularity import Layout
from ..kquant_quantizer import KQuantQuantizer
from ..kquants import KQUANTS, gguf_type_of, kquant_blocks
from ..microscaling import mxfp4_codes
from ..modules import QuantModuleMixin

__all__ = ["export_gguf", "gguf_blocks", "gguf_type_for", "kquant_layers", "llama_embed", "mxfp4_blocks"]

QK = 32  # weights per Q8_0 / Q4_0 block

_INT_BUFFERS = ("qweight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


def gguf_type_for(mod: IntModuleMixin, name: str = "") -> str:
    """``"Q4_0"`` or ``"Q8_0"``: the block format an integer layer's weight is written in.

    Raises:
        QATConfigError: the weight's spec has no GGUF block form (granularity, group size, zero
            point, or scales that are not float16), naming the layer and the presets that fit.
    """
    spec = mod.weight_spec
    where = f"layer {name!r}" if name else type(mod).__name__
    hint = "train with the gguf_q8_0 or gguf_q4_0 preset (configs/quant/)"
    if spec is None:
        raise QATConfigError(f"{where}: weight is not quantized; {hint}")
    if getattr(mod, "input_smooth", None) is not None:
        raise QATConfigError(
            f"{where}: the layer is smoothed (qat.smooth_inputs) and llama.cpp has no per-channel input scale "
            f"to divide its input by; train without smoothing for GGUF; {hint}"
        )
    if Layout.of(spec).group_size != QK or len(mod.view_shape) != 2:
        raise QATConfigError(
            f"{where}: GGUF Q8_0 / Q4_0 need per_group weights with group_size {QK} along the last axis, "
            f"got {spec.granularity.value} (group_size={spec.group_size}); {hint}"
        )
    if not spec.signed or mod.weight_zero_point is not None:
        raise QATConfigError(f"{where}: GGUF Q8_0 / Q4_0 blocks are signed and symmetric (no zero point); {hint}")
    if mod.weight_scale.dtype != torch.float16:
        raise QATConfigError(
            f"{where}: GGUF blocks store float16 scales, this layer's trained scales are not float16-exact "
            f"(scale_dtype={spec.scale_dtype.value}, estimator={spec.estimator.value}); {hint}"
        )
    if spec.bits <= 4:
        return "Q4_0"
    if spec.bits <= 8:
        return "Q8_0"
    raise QATConfigError(f"{where}: {spec.bits}-bit weights have no GGUF Q8_0 / Q4_0 form (at most 8 bits); {hint}")


def _prepared_format(mod: Any) -> Optional[str]:
    """The format of a fake-quantized layer's weight that GGUF stores from the prepared layer (a
    k-quant ``"q4_k"``, ..., or ``"mxfp4"``), else None."""
    if not isinstance(mod, QuantModuleMixin) or mod.weight_quantizer is None:
        return None
    if not bool(mod.weight_quantizer.fake_quant_enabled):
        return None
    fmt = mod.weight_quantizer.spec.format.value
    return fmt if fmt in KQUANTS or fmt == "mxfp4" else None


def _kquant_format(mod: Any) -> Optional[str]:
    """The k-quant format of a fake-quantized layer's weight (``"q4_k"``, ...), else None."""
    fmt = _prepared_format(mod)
    return fmt if fmt in KQUANTS else None


def mxfp4_blocks(w: torch.Tensor) -> np.ndarray:
    """GGUF MXFP4 blocks of weight ``w`` (rows, K), K a multiple of 32: ``uint8 (rows, K / 32 * 17)``,
    each block the E8M0 byte then 16 bytes, byte ``j`` holding element ``j``'s 4-bit E2M1 code in its
    low nibble and element ``j + 16``'s in its high nibble (ggml's ``block_mxfp4``). The codes and
    scales are :func:`qat.microscaling.mxfp4_codes`: what the ``mxfp4`` fake quantization used.

    Example::

        >>> import gguf
        >>> from qat.microscaling import fake_quantize_format
        >>> w = torch.randn(4, 64)
        >>> b = mxfp4_blocks(w)
        >>> b.shape, bool((gguf.quants.dequantize(b, gguf.GGMLQuantizationType.MXFP4)
        ...                == fake_quantize_format(w, "mxfp4").numpy()).all())
        ((4, 34), True)
    """
    e, q = mxfp4_codes(w.detach().float().cpu())
    rows, k = q.shape
    qb = q.numpy().reshape(rows, k // QK, QK)
    payload = qb[..., : QK // 2] | (qb[..., QK // 2 :] << 4)  # (rows, K/32, 16)
    blocks = np.concatenate([e.numpy().reshape(rows, k // QK, 1), payload], axis=-1)  # (rows, K/32, 17)
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def kquant_layers(model: nn.Module) -> dict[str, str]:
    """The layers of a prepared ``model`` whose weight is a llama.cpp k-quant: name -> format.
    Those have no integer layer (``qat.convert`` refuses them): the prepared model goes to
    :func:`export_gguf` as it is, and GGUF is the one file format they export to.

    Example::

        >>> from qat import prepare
        >>> kquant_layers(prepare(nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 4)), "gguf_q4_k"))
        {'0': 'q4_k', '2': 'q4_k'}
    """
    out = {}
    for name, mod in model.named_modules():
        fmt = _kquant_format(mod)
        if fmt is not None:
            out[name] = fmt
    return out


def gguf_blocks(mod: Union[IntModuleMixin, QuantModuleMixin], name: str = "") -> tuple[np.ndarray, str]:
    """The layer's weight as GGUF block bytes: ``(uint8 array (rows, bytes_per_row), type name)``:
    ``"Q4_0"`` / ``"Q8_0"`` for a converted layer, ``"Q2_K"`` .. ``"Q6_K"`` for a prepared layer
    whose weight spec has a k-quant ``format``, ``"MXFP4"`` for one with ``format: mxfp4`` (its
    fake-quantized weight's own codes and scales).

    Example::

        >>> import gguf, torch.nn as nn
        >>> from qat import prepare
        >>> layer = prepare(nn.Sequential(nn.Linear(256, 4)), "gguf_q4_k")[0]
        >>> blocks, qtype = gguf_blocks(layer)
        >>> qtype, blocks.shape
        ('Q4_K', (4, 144))
        >>> bool((gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
        ...       == layer.quantized_weight().detach().numpy()).all())
        True
    """
    fmt = _prepared_format(mod)
    if fmt is not None:
        if getattr(mod, "input_smooth", None) is not None:
            where = f"layer {name!r}" if name else type(mod).__name__
            raise QATConfigError(
                f"{where}: the layer is smoothed (qat.smooth_inputs) and llama.cpp has no per-channel input scale "
                f"to divide its input by; train without smoothing for GGUF"
            )
        w = mod.latent_weight().detach()
        if fmt == "mxfp4":  # E8M0 block scales and E2M1 codes from the weight, as its fake quantization
            if w.dim() != 2:
                where = f"layer {name!r}" if name else type(mod).__name__
                raise QATConfigError(f"{where}: GGUF MXFP4 stores 2-d weights (rows, K), got shape {tuple(w.shape)}")
            return mxfp4_blocks(w), "MXFP4"
        wq, learned = mod.weight_quantizer, None
        if isinstance(wq, KQuantQuantizer):  # the learned scales as trained, not searched again
            if not wq.is_initialized:
                wq.init_from(w)
            learned = wq.learned()
        return kquant_blocks(w, fmt, learned), gguf_type_of(fmt, w.shape[-1])
    if isinstance(mod, QuantModuleMixin):
        where = f"layer {name!r}" if name else type(mod).__name__
        raise QATConfigError(
            f"{where}: a fake-quantized layer with an affine weight spec; convert the model first (qat.convert) "
            f"for Q8_0 / Q4_0, or train with a k-quant preset (gguf_q2_k .. gguf_q6_k) to export it prepared"
        )
    qtype = gguf_type_for(mod, name)
    q = mod.codes().cpu().numpy().astype(np.int32)  # (O, K)
    rows, k = q.shape
    d = mod.weight_scale.detach().cpu().numpy().astype(np.float16).reshape(rows, k // QK, 1)  # (O, K/32, 1)
    d_bytes = d.view(np.uint8)  # (O, K/32, 2), little-endian float16
    qb = q.reshape(rows, k // QK, QK)  # (O, K) -> (O, K/32, 32)
    if qtype == "Q8_0":
        payload = qb.astype(np.int8).view(np.uint8)  # (O, K/32, 32)
    else:
        u = (qb + 8).astype(np.uint8)  # [-8, 7] -> [0, 15]
        payload = u[..., : QK // 2] | (u[..., QK // 2 :] << 4)  # (O, K/32, 16)
    blocks = np.concatenate([d_bytes, payload], axis=-1)  # (O, K/32, 34 | 18)
    return np.ascontiguousarray(blocks.reshape(rows, -1)), qtype


def _vocab(writer, tokenizer_dir: str, type_vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    n = max(by_id) + 1
    special = set(tok.all_special_ids)
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i, f"[PAD{i}]")
        if i in special:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
            continue
        types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
        tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)  # llama.cpp's phantom-space WordPiece
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(type_vocab_size)
    gguf.SpecialVocab(tokenizer_dir, n_vocab=n).add_to_gguf(writer)


def export_gguf(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
    name: Optional[str] = None,
    float_to: Optional[str] = None,
) -> str:
    """Write a (converted) transformers ``BertModel`` as a GGUF file llama.cpp runs for embeddings.

    Args:
        model: a ``BertModel`` converted with :func:`qat.convert` after training with a GGUF preset
            (its integer Linear weights become Q8_0 / Q4_0 blocks as trained), a prepared one trained
            with a k-quant preset or mix (its k-quant weights become Q2_K .. Q6_K blocks as trained),
            or a float one.
        path: the ``.gguf`` file to write.
        tokenizer_dir: the directory of the model's tokenizer files (``vocab.txt``,
            ``tokenizer_config.json``, ...); default ``model.config.name_or_path``.
        name: ``general.name`` (default: the tokenizer directory's name).
        float_to: ``"q4_0"`` / ``"q8_0"``: quantize the *float* Linear weights with ggml's reference
            quantizer (gguf-py) instead of writing them as F32: the post-training baseline.

    Returns:
        the path written.

    Raises:
        QATConfigError: not a BERT model, a quantized weight with no GGUF block form, or an unknown ``float_to``.

    Example::

        from qat.recipes.minilm import load_minilm
        model, tok = load_minilm()
        prepare(model, "gguf_q4_0"); ...train...; export_gguf(convert(model), "minilm-q4_0.gguf")
    """
    import gguf

    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        raise QATConfigError(
            f"export_gguf() writes BERT encoders (a transformers BertModel with config.model_type 'bert'); "
            f"got {type(model).__name__} with model_type {getattr(config, 'model_type', None)!r}"
        )
    qtypes = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    if float_to is not None and float_to.lower() not in qtypes:
        raise QATConfigError(f"export_gguf(float_to={float_to!r}): valid choices are {sorted(qtypes)} or None")
    tokenizer_dir = os.fspath(tokenizer_dir or config.name_or_path)
    if not os.path.isdir(tokenizer_dir):
        raise QATConfigError(f"export_gguf(): tokenizer_dir {tokenizer_dir!r} is not a directory with the model's tokenizer files")
    path = os.fspath(path)
    n_layers = int(config.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)

    # the tensors to write: integer layers as blocks, everything else as stored
    entries: list[tuple[str, Any]] = []
    int_mods = {n: m for n, m in model.named_modules() if isinstance(m, IntModuleMixin)}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    skip = {f"{n}.{b}" for n in int_mods for b in _INT_BUFFERS}
    quant_mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)}
    quantizer_prefixes = tuple(f"{n}.{q}_quantizer." for n in quant_mods for q in ("weight", "input"))
    for key, value in model.state_dict().items():
        if key in skip:
            if key.endswith(".qweight"):
                layer = key[: -len(".qweight")]
                entries.append((f"{layer}.weight", int_mods[layer]))
            continue
        if key.startswith(quantizer_prefixes):
            continue  # a prepared layer's quantizer state: its blocks come from the layer itself
        layer, _, leaf = key.rpartition(".")
        mod = quant_mods.get(layer)
        if mod is not None and leaf == "weight" and mod.weight_quantizer is not None:
            gguf_blocks(mod, layer)  # refuses an affine fake-quantized layer (convert those first)
            if _prepared_format(mod) is not None:
                entries.append((key, mod))
                continue
        entries.append((key, value))

    n_q4 = n_q8 = n_mx = 0
    n_k: dict[str, int] = {}
    writer = gguf.GGUFWriter(path, "bert")
    tensors: list[tuple[str, np.ndarray, Optional[Any]]] = []
    for key, value in entries:
        if key.startswith("pooler.") or key == "embeddings.position_ids":
            continue  # llama.cpp pools itself (mean); the BERT pooler head is not used
        base, _, suffix = key.rpartition(".")
        gname = tmap.get_name(base)
        if gname is None:
            raise QATConfigError(f"export_gguf(): tensor {key!r} has no llama.cpp BERT name")
        gname = f"{gname}.{suffix}"
        if isinstance(value, (IntModuleMixin, QuantModuleMixin)):
            blocks, qtype = gguf_blocks(value, base)
            n_k[qtype] = n_k.get(qtype, 0) + qtype.endswith("_K")  # (fallback types do not name the file)
            n_q4 += qtype == "Q4_0"
            n_q8 += qtype == "Q8_0"
            n_mx += qtype == "MXFP4"
            tensors.append((gname, blocks, getattr(gguf.GGMLQuantizationType, qtype)))
            continue
        data = value.detach().float().cpu().numpy()
        if float_to is not None and key in linear_weights and data.ndim == 2:
            qt = qtypes[float_to.lower()]
            n_q4 += qt == gguf.GGMLQuantizationType.Q4_0
            n_q8 += qt == gguf.GGMLQuantizationType.Q8_0
            tensors.append((gname, gguf.quants.quantize(data, qt), qt))
            continue
        tensors.append((gname, np.ascontiguousarray(data, dtype=np.float32), None))

    writer.add_name(name or os.path.basename(os.path.normpath(tokenizer_dir)))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_block_count(n_layers)
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if n_q4 else gguf.LlamaFileType.MOSTLY_Q8_0 if n_q8 else gguf.LlamaFileType.ALL_F32
    if n_mx:  # llama.cpp's one MXFP4 file type (named for the gpt-oss experts it was made for)
        ftype = gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    n_k = {k: v for k, v in n_k.items() if v}
    if n_k:  # the most common k-quant names the file type (_M for a mix, as llama.cpp)
        main = max(n_k, key=lambda k: (n_k[k], k))[:2]
        ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{main}_K" if main in ("Q2", "Q6") else f"MOSTLY_{main}_K_{'M' if len(n_k) > 1 else 'S'}")
    writer.add_file_type(ftype)
    _vocab(writer, tokenizer_dir, int(getattr(config, "type_vocab_size", 1)))
    for gname, data, raw in tensors:
        if raw is None:
            writer.add_tensor(gname, data)
        else:
            writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_embed(path: Union[str, os.PathLike], sentences, n_threads: int = 2, extra_buffers: bool = False) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings of a GGUF file, computed by llama.cpp
    (llama-cpp-python), one sentence at a time: the check that llama.cpp runs what we wrote.

    Args:
        extra_buffers: let llama.cpp use its extra CPU buffer types (AMX / repacked weights). Off by
            default: on CPUs that report AMX inside some VMs and sandboxes, the AMX path of ggml-cpu
            faults on Q8_0 / Q4_0 weights (seen with llama-cpp-python 0.3.36).
    """
    import llama_cpp.llama_cpp as _C
    from llama_cpp import Llama

    default = _C.llama_model_default_params

    def _params():
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    _C.llama_model_default_params = _params
    try:
        llm = Llama(os.fspath(path), embedding=True, verbose=False, n_ctx=512, n_threads=n_threads)
    finally:
        _C.llama_model_default_params = default
    try:
        e = torch.tensor([llm.embed(s) for s in sentences], dtype=torch.float32)
    finally:
        llm.close() if hasattr(llm, "close") else None
    return torch.nn.functional.normalize(e, dim=-1)
