"""ByteTokenizer: round trips, specials, invalid input."""

from __future__ import annotations

import numpy as np
import pytest

from swarm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer


def test_round_trip_ascii_and_non_ascii() -> None:
    tok = ByteTokenizer()
    for text in ["", "hello world\n", "naïve café — 日本語 🚀", "\x00\x7f"]:
        ids = tok.encode(text)
        assert ids.dtype == np.uint16
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_ids_are_bytes() -> None:
    assert ByteTokenizer().encode("é").tolist() == [0xC3, 0xA9]


def test_specials_are_dropped_and_distinct() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 260
    assert len({BOS_ID, EOS_ID, PAD_ID}) == 3 and min(BOS_ID, EOS_ID, PAD_ID) >= 256
    ids = [BOS_ID, *tok.encode("ab").tolist(), EOS_ID, PAD_ID, 259]
    assert tok.decode(ids) == "ab"


def test_decode_accepts_lists_tensors_and_replaces_bad_utf8() -> None:
    import torch

    tok = ByteTokenizer()
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"  # a lone lead byte


def test_decode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([300])


def test_byte_tokenizer_is_the_run_default_with_no_file() -> None:
    from swarm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.kind == "byte" and tok.sha256 == ""
    assert isinstance(load_tokenizer("byte"), ByteTokenizer) and isinstance(load_tokenizer(""), ByteTokenizer)
