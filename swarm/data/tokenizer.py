"""Byte-level tokenizer: every UTF-8 byte is a token, plus four special ids.

Bytes need no vocabulary file, no download and no training, and every peer of a run gets the
same ids from the same text on any platform; the price is ~4x longer sequences than BPE.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BYTE_VOCAB = 256
BOS_ID = 256  # start of a prompt for generation
EOS_ID = 257  # document separator in the training stream
PAD_ID = 258  # never produced by the data pipeline; free for callers that pad
RESERVED_ID = 259  # kept so vocab_size stays 260 if a special is added later
VOCAB_SIZE = 260

TOKEN_DTYPE = np.uint16  # 260 ids fit in 16 bits; halves memory against int32


class ByteTokenizer:
    """Maps text to byte ids (0..255) and back; ids >= 256 are specials and decode to nothing."""

    vocab_size: int = VOCAB_SIZE
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of `text` as a uint16 array of shape (len(bytes),)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes as token ids; files are tokenised this way so invalid UTF-8 survives."""
        return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of the byte ids in `ids`; specials are dropped, bad UTF-8 becomes U+FFFD."""
        arr = np.asarray(list(ids) if not hasattr(ids, "__array__") else ids).reshape(-1)
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
            raise ValueError(f"token id out of range 0..{VOCAB_SIZE - 1}: min {arr.min()}, max {arr.max()}")
        return arr[arr < BYTE_VOCAB].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
