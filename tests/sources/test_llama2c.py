"""End-to-end test of qllm.llama2c: convert Karpathy's stories260K and generate."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

from qllm.sources.llama2c import convert_llama2c

DATA_DIR = Path(os.environ.get("QLLM_DATA_DIR", "/work/shared/data"))
MODEL_DIR = DATA_DIR / "models" / "stories260K"
FILES = ("stories260K.bin", "tok512.model", "tok512.bin")

# Karpathy's documented greedy sample for stories260K (llama2.c README, temperature 0).
EXPECTED_PREFIX = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
)


def _require_data() -> None:
    missing = [f for f in FILES if not (MODEL_DIR / f).is_file()]
    if missing:
        pytest.skip(f"QLLM_DATA_DIR/models/stories260K not found: {MODEL_DIR} (missing {', '.join(missing)})")


def _read_llama2c_vocab(path: Path) -> list[bytes]:
    """Pieces from llama2.c's tokenizer.bin: int32 max_len, then (f32 score, int32 len, bytes)*."""
    raw = path.read_bytes()
    pos = 4
    pieces: list[bytes] = []
    while pos < len(raw):
        _score, n = struct.unpack_from("<fi", raw, pos)
        pos += 8
        pieces.append(raw[pos : pos + n])
        pos += n
    return pieces


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_data()
    out = tmp_path_factory.mktemp("llama2c") / "stories260K-hf"
    convert_llama2c(MODEL_DIR / "stories260K.bin", MODEL_DIR / "tok512.model", out)
    return out


def test_output_files_and_config(converted: Path) -> None:
    from transformers import AutoConfig

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (converted / name).is_file(), name
    # Nothing left behind by the atomic write (temp dirs live next to out_dir).
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]

    cfg = AutoConfig.from_pretrained(converted)
    assert cfg.model_type == "llama"
    assert cfg.hidden_size == 64
    assert cfg.num_hidden_layers == 5
    assert cfg.num_attention_heads == 8
    assert cfg.num_key_value_heads == 4
    assert cfg.vocab_size == 512
    assert cfg.intermediate_size == 172
    assert cfg.max_position_embeddings == 512
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_tokenizer(converted: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert len(tok) == 512

    # Vocabulary ids agree with llama2.c's own tokenizer file (which uses
    # "<0xNN>" byte pieces like SentencePiece, and plain spaces for "▁").
    llama2c_pieces = _read_llama2c_vocab(MODEL_DIR / "tok512.bin")
    assert len(llama2c_pieces) == 512
    for i in range(3, 512):
        hf_piece = tok.convert_ids_to_tokens(i).replace("\u2581", " ").encode("utf-8")
        assert hf_piece == llama2c_pieces[i], i

    ids = tok("Once upon a time").input_ids
    assert ids == [1, 403, 407, 261, 378]  # BOS prepended
    for text in ("Once upon a time", "Lily said, \"Mom!\"\nHe was 3.", "émoji 😀 ü"):
        enc = tok(text).input_ids
        assert enc[0] == tok.bos_token_id
        assert tok.decode(enc, skip_special_tokens=True) == text


def test_greedy_generation_matches_reference(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.dtype == torch.float32
    model.eval()

    inputs = tok("Once upon a time", return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == 1
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(EXPECTED_PREFIX), text
