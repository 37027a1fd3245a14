"""Convert Karpathy's llama2.c legacy ("version 0") checkpoints to Hugging Face format.

llama2.c (https://github.com/karpathy/llama2.c) stores a model as a raw binary:

* a header of 7 little-endian int32:
  ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len``
  (a *negative* ``vocab_size`` means the output classifier is NOT tied to the
  token embedding and is stored separately at the very end of the file);
* then float32 arrays, in this order::

      token_embedding [V, dim]
      rms_att         [L, dim]
      wq              [L, dim, dim]
      wk              [L, kv_dim, dim]
      wv              [L, kv_dim, dim]
      wo              [L, dim, dim]
      rms_ffn         [L, dim]
      w1              [L, hidden, dim]     (gate_proj)
      w2              [L, dim, hidden]     (down_proj)
      w3              [L, hidden, dim]     (up_proj)
      rms_final       [dim]
      freq_cis_real   [max_seq_len, head_size // 2]   (unused: recomputed by HF)
      freq_cis_imag   [max_seq_len, head_size // 2]   (unused)
      wcls            [V, dim]             (only when vocab_size < 0)

  where ``kv_dim = dim * n_kv_heads // n_heads``.  Linear weights are stored
  as ``[out_features, in_features]`` exactly like ``torch.nn.Linear``.

llama2.c applies RoPE to *interleaved* pairs (dims 2i, 2i+1 of every head),
whereas HF's ``LlamaForCausalLM`` rotates *halves* (dims i, i + head_size/2).
The two are equivalent up to a fixed permutation of the output rows of
``wq``/``wk`` within each head, which is what :func:`_permute_rotary` applies
(identical to ``permute`` in HF's ``convert_llama_weights_to_hf.py``, the
inverse of ``permute_reverse`` in llama2.c's ``export.py``).

The result is a directory loadable offline with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["convert_llama2c"]

_HEADER_FORMAT = "<7i"  # 7 little-endian int32
_HEADER_BYTES = struct.calcsize(_HEADER_FORMAT)

# Constants of llama2.c's training code (model.py / run.c) that the legacy
# header does not record.
_ROPE_THETA = 10000.0
_RMS_NORM_EPS = 1e-5
_BOS_ID = 1
_EOS_ID = 2


@dataclass(frozen=True)
class _Llama2cHeader:
    """Hyper-parameters read from the 28-byte llama2.c header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; see ``shared_classifier``
    max_seq_len: int
    shared_classifier: bool  # True when the file's vocab_size was positive

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads


def _read_header(raw: bytes) -> _Llama2cHeader:
    if len(raw) < _HEADER_BYTES:
        raise ValueError(f"file too short for a llama2.c header ({len(raw)} bytes)")
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from(_HEADER_FORMAT, raw, 0)
    header = _Llama2cHeader(
        dim=dim,
        hidden_dim=hidden,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        vocab_size=abs(vocab),
        max_seq_len=seq,
        shared_classifier=vocab > 0,
    )
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq) <= 0:
        raise ValueError(f"invalid llama2.c header: {header}")
    if dim % heads or heads % kv_heads or header.head_size % 2:
        raise ValueError(f"inconsistent head geometry in llama2.c header: {header}")
    return header


class _FloatReader:
    """Sequentially slices float32 tensors out of the checkpoint body."""

    def __init__(self, body: np.ndarray) -> None:
        self._body = body
        self._pos = 0

    def take(self, *shape: int) -> torch.Tensor:
        count = int(np.prod(shape))
        if self._pos + count > self._body.size:
            raise ValueError("llama2.c checkpoint is truncated (fewer floats than the header implies)")
        chunk = self._body[self._pos : self._pos + count].reshape(shape)
        self._pos += count
        # Copy: the numpy view is read-only and torch wants owned, writable memory.
        return torch.from_numpy(chunk.astype(np.float32, copy=True))

    def skip(self, count: int) -> None:
        self.take(count)

    @property
    def remaining(self) -> int:
        return self._body.size - self._pos


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair RoPE to rotate-half RoPE.

    Within each head, llama2.c's output dims are ordered ``(pair i, component c)``
    (``c`` = real/imag); HF expects ``(component c, pair i)``.  ``w`` has shape
    ``[n_heads * head_size, in_features]``.
    """
    out_features, in_features = w.shape
    head_size = out_features // n_heads
    return (
        w.view(n_heads, head_size // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def _load_state_dict(bin_path: Path) -> tuple[_Llama2cHeader, dict[str, torch.Tensor]]:
    """Parse a llama2.c v0 file into a HF ``LlamaForCausalLM`` state dict."""
    raw = bin_path.read_bytes()
    h = _read_header(raw)
    if (len(raw) - _HEADER_BYTES) % 4:
        raise ValueError(f"{bin_path}: body size is not a multiple of 4 bytes")
    body = np.frombuffer(raw, dtype="<f4", offset=_HEADER_BYTES)
    r = _FloatReader(body)
    L, D, H, KV, V = h.n_layers, h.dim, h.hidden_dim, h.kv_dim, h.vocab_size

    embed = r.take(V, D)
    rms_att = r.take(L, D)
    wq = r.take(L, D, D)
    wk = r.take(L, KV, D)
    wv = r.take(L, KV, D)
    wo = r.take(L, D, D)
    rms_ffn = r.take(L, D)
    w1 = r.take(L, H, D)
    w2 = r.take(L, D, H)
    w3 = r.take(L, H, D)
    rms_final = r.take(D)
    # Precomputed RoPE tables (real, imag): HF recomputes them from rope_theta.
    r.skip(h.max_seq_len * h.head_size // 2)
    r.skip(h.max_seq_len * h.head_size // 2)
    lm_head = embed if h.shared_classifier else r.take(V, D)
    if r.remaining:
        raise ValueError(
            f"{bin_path}: {r.remaining} unexpected trailing floats; not a llama2.c legacy (version 0) checkpoint?"
        )

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": rms_final,
        "lm_head.weight": lm_head,
    }
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "self_attn.q_proj.weight"] = _permute_rotary(wq[i], h.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _permute_rotary(wk[i], h.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    return h, sd


def _save_model(h: _Llama2cHeader, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Write config.json, generation_config.json and model.safetensors (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_size,
        hidden_act="silu",
        max_position_embeddings=h.max_seq_len,
        rms_norm_eps=_RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
        tie_word_embeddings=h.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    model.to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)


def _save_tokenizer(tokenizer_model: Path, out: Path) -> None:
    """Convert the SentencePiece ``.model`` to a HF Llama tokenizer saved in ``out``.

    The SentencePiece file is staged as ``tokenizer.model`` (the name HF's
    Llama tokenizer looks for) and converted into a ``tokenizer.json``
    (BPE + byte_fallback, Metaspace pre-tokenizer).  The ``.model`` itself is
    kept in ``out`` too, for tools that want raw SentencePiece.

    Note: like HF's conversion of Meta's Llama-2 tokenizer, the SentencePiece
    ``remove_extra_whitespaces`` normalisation is not reproduced, so runs of
    spaces encode differently from ``sentencepiece`` (llama2.c's own ``run.c``
    encoder does not collapse them either).
    """
    import importlib.util

    from transformers import LlamaTokenizer

    # transformers needs the `sentencepiece` package to read a .model file
    # (only at conversion time; the saved tokenizer.json loads without it).
    if importlib.util.find_spec("sentencepiece") is None:
        raise ImportError("converting a SentencePiece tokenizer requires `pip install sentencepiece`")

    staged = out / "tokenizer.model"
    shutil.copyfile(tokenizer_model, staged)
    tokenizer = LlamaTokenizer.from_pretrained(
        out,
        add_bos_token=True,  # llama2.c always starts a sequence with BOS (id 1)
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
    )
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (_BOS_ID, _EOS_ID):
        raise ValueError(
            f"{tokenizer_model}: expected bos/eos ids {_BOS_ID}/{_EOS_ID}, "
            f"got {tokenizer.bos_token_id}/{tokenizer.eos_token_id}"
        )
    tokenizer.save_pretrained(out)


def _install_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` directory to ``out_dir``.

    A plain rename is atomic; if ``out_dir`` already exists (and is not an
    empty directory) the old one is first renamed aside, the new one renamed
    in, and only then is the old one deleted, so ``out_dir`` never holds a
    half-written conversion.
    """
    try:
        os.replace(tmp, out_dir)  # atomic; succeeds if out_dir is absent or an empty dir
        return
    except OSError:
        if not out_dir.exists():
            raise
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def convert_llama2c(bin_path: Path, tokenizer_model: Path, out_dir: Path) -> None:
    """Convert a llama2.c legacy (version 0) checkpoint to a HF Llama directory.

    Args:
        bin_path: llama2.c ``.bin`` checkpoint (e.g. ``stories260K.bin``).
        tokenizer_model: SentencePiece model used to train it (e.g. ``tok512.model``).
        out_dir: destination directory; it receives ``config.json``,
            ``generation_config.json``, ``model.safetensors`` (float32),
            ``tokenizer.json``, ``tokenizer_config.json`` and ``tokenizer.model``.
            It is built in a temporary sibling directory and renamed into place,
            replacing any previous contents.
    """
    bin_path, tokenizer_model, out_dir = Path(bin_path), Path(tokenizer_model), Path(out_dir)
    header, state_dict = _load_state_dict(bin_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        _save_model(header, state_dict, tmp)
        _save_tokenizer(tokenizer_model, tmp)
        _install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
