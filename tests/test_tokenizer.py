"""Tests for models.tokenizer.ByteTokenizer."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()

SAMPLES = [
    "日本語のテキストです。",  # Japanese
    "مرحبا بالعالم",  # Arabic
    "Καλημέρα κόσμε",  # Greek
    "emoji: 🚀🌍👩‍👩‍👧",  # emoji incl. ZWJ sequence
    "Ça été très appréciée, où est l'hôtel ? œuf",  # accented French
    "",
]


def test_import_does_not_pull_torch() -> None:
    # data-loading code relies on the tokenizer (and models/__init__) being torch-free
    code = "import sys, models.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=30)


def test_vocab_size() -> None:
    assert TOK.vocab_size == 256 == ByteTokenizer.vocab_size


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_multilingual(text: str) -> None:
    ids = TOK.encode(text)
    assert all(isinstance(i, int) and 0 <= i <= 255 for i in ids)
    assert TOK.decode(ids) == text
    arr = TOK.encode_np(text)
    assert arr.dtype == np.uint8 and arr.tolist() == ids
    assert TOK.decode(arr) == text


@given(st.text())
def test_round_trip_property(text: str) -> None:
    ids = TOK.encode(text)
    assert all(0 <= i <= 255 for i in ids)
    assert TOK.decode(ids) == text


@given(st.binary())
def test_decode_arbitrary_bytes_never_raises(data: bytes) -> None:
    out = TOK.decode(list(data))
    assert isinstance(out, str)


def test_decode_invalid_utf8_replaces() -> None:
    assert TOK.decode([0xFF, 0xFE, 0x41]) == "\ufffd\ufffdA"
    assert TOK.decode(TOK.encode("日")[:2]) == "\ufffd"  # truncated multi-byte char


def test_decode_rejects_out_of_vocab_ids() -> None:
    with pytest.raises(ValueError, match="0..255"):
        TOK.decode([256])
    with pytest.raises(ValueError, match="0..255"):
        TOK.decode([-1])


def test_decode_int64_array_is_by_value() -> None:
    # bytes(np.int64 array) would copy the raw 8-byte buffer; decode must use values
    assert TOK.decode(np.array([72, 105], dtype=np.int64)) == "Hi"
