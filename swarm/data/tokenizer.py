"""Tokenizers: the zero-setup byte tokenizer (default) and byte-level BPE from a ``tokenizer.json``.

Bytes need no vocabulary file, no download and no training, and every peer of a run gets the
same ids from the same text on any platform; the price is ~4x longer sequences than BPE.

A BPE tokenizer is one ``tokenizer.json`` file of the Hugging Face ``tokenizers`` library (an
optional dependency: ``pip install 'swarm[bpe]'``), trained on the run's corpus with
``swarm-tokenizer train`` or taken from elsewhere. The file is part of the run: its sha256 is in the
signed run description and every peer checks the file it tokenises with against it. Parsing it is
JSON in the library's own loader; nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from swarm.log import get_logger

if TYPE_CHECKING:
    from swarm.net.files import FileService
    from swarm.run import RunConfig

logger = get_logger(__name__)

BYTE_VOCAB = 256
BOS_ID = 256  # start of a prompt for generation
EOS_ID = 257  # document separator in the training stream
PAD_ID = 258  # never produced by the data pipeline; free for callers that pad
RESERVED_ID = 259  # kept so vocab_size stays 260 if a special is added later
VOCAB_SIZE = 260

TOKEN_DTYPE = np.uint16  # corpora are stored as uint16: halves memory against int32
MAX_VOCAB = 2**16  # ... which caps the vocabulary of any tokenizer at 65536 ids
MAX_TOKENIZER_BYTES = 64 * 2**20  # a tokenizer.json from a peer larger than this is refused
TOKENIZER_FILE = "tokenizer.json"  # the name a run's tokenizer is kept under next to checkpoints and states

# Special tokens of every tokenizer this module writes, in id order for the byte tokenizer
# (256..259) and at ids 0..3 for a trained BPE (the trainer puts specials first).
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, RESERVED_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>", "<|reserved|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, RESERVED_TOKEN)
# A tokenizer.json from elsewhere names its specials its own way; the first name present wins.
_EOS_NAMES = (EOS_TOKEN, "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BOS_NAMES = (BOS_TOKEN, "<s>", "<bos>", "<|begin_of_text|>")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]")


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed, too large, or not the one the run names."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ByteTokenizer:
    """Maps text to byte ids (0..255) and back; ids >= 256 are specials and decode to nothing."""

    kind: str = "byte"
    vocab_size: int = VOCAB_SIZE
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    sha256: str = ""  # the run description's value for "the byte tokenizer": there is no file

    def encode(self, text: str) -> np.ndarray:
        """UTF-8 bytes of `text` as a uint16 array of shape (len(bytes),)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes as token ids; files are tokenised this way so invalid UTF-8 survives."""
        return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        return [self.encode_bytes(d) for d in documents]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of the byte ids in `ids`; specials are dropped, bad UTF-8 becomes U+FFFD."""
        arr = _id_array(ids, VOCAB_SIZE)
        return arr[arr < BYTE_VOCAB].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same tokenizer as a ``tokenizers`` ``tokenizer.json`` (for an exported model): a BPE
        with the 256 byte symbols as its vocabulary and no merges, so every byte is one token with
        the same id as here, and the four specials at 256..259."""
        vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
        tok = _new_byte_level_bpe(vocab, merges=[], use_regex=False)
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [BOS_ID, EOS_ID, PAD_ID, RESERVED_ID]:
            raise AssertionError("byte tokenizer specials did not land on ids 256..259")
        return str(tok.to_str())


class BPETokenizer:
    """A ``tokenizers`` BPE loaded from the bytes of a ``tokenizer.json``; ``sha256`` is of those bytes."""

    kind: str = "bpe"

    def __init__(self, data: bytes, *, source: str = "<bytes>") -> None:
        if len(data) > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{source}: tokenizer file of {len(data)} bytes exceeds {MAX_TOKENIZER_BYTES}")
        tokenizers = _import_tokenizers()
        try:
            text = data.decode("utf-8")
            json.loads(text)  # a clear error for non-JSON before the library's own message
            self._tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # UnicodeDecodeError, ValueError, the library's Exception
            raise TokenizerError(f"{source}: not a tokenizers tokenizer.json ({exc})") from exc
        self.source = source
        self.sha256 = sha256_bytes(data)
        self._json = text
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        if not 0 < self.vocab_size <= MAX_VOCAB:
            raise TokenizerError(
                f"{source}: vocabulary of {self.vocab_size} ids; at most {MAX_VOCAB} are supported (uint16 corpora)"
            )
        eos = self._find(_EOS_NAMES)
        if eos is None:
            raise TokenizerError(f"{source}: no end-of-text token (looked for {list(_EOS_NAMES)}); documents need a separator")
        self.eos_id: int = eos
        bos = self._find(_BOS_NAMES)
        self.bos_id: int = bos if bos is not None else eos  # GPT-2 style: one token for both
        pad = self._find(_PAD_NAMES)
        self.pad_id: int = pad if pad is not None else eos
        self._specials = {i for i in (self.bos_id, self.eos_id, self.pad_id)}

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {str(path)!r}")
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise TokenizerError(f"{path}: tokenizer file larger than {MAX_TOKENIZER_BYTES} bytes")
        return cls(path.read_bytes(), source=str(path))

    def _find(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    def token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=TOKEN_DTYPE)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Bytes as text (invalid UTF-8 becomes U+FFFD: BPE merges are learnt over text)."""
        return self.encode(data.decode("utf-8", errors="replace"))

    def encode_documents(self, documents: list[bytes]) -> list[np.ndarray]:
        """Many documents at once (the library encodes a batch on all cores)."""
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=TOKEN_DTYPE) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr = _id_array(ids, self.vocab_size)
        return str(self._tok.decode([int(i) for i in arr if int(i) not in self._specials], skip_special_tokens=True))

    def to_json(self) -> str:
        return self._json


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(path: str | Path | None, *, expected_sha256: str | None = None) -> Tokenizer:
    """The byte tokenizer for None, "" or "byte"; else the BPE in the ``tokenizer.json`` at `path`.

    With `expected_sha256` (a run description's ``tokenizer_sha256``), a different tokenizer is a
    TokenizerError naming both hashes.
    """
    tok: Tokenizer = ByteTokenizer() if path in (None, "", "byte") else BPETokenizer.from_file(path)
    if expected_sha256 is not None:
        check_tokenizer_hash(tok, expected_sha256)
    return tok


def check_tokenizer_hash(tok: Tokenizer, expected_sha256: str) -> None:
    """TokenizerError unless `tok` is the tokenizer the run names ("" = the byte tokenizer)."""
    if tok.sha256 != expected_sha256:
        ours = f"sha256 {tok.sha256}" if tok.sha256 else "the byte tokenizer"
        theirs = f"sha256 {expected_sha256}" if expected_sha256 else "the byte tokenizer"
        raise TokenizerError(
            f"tokenizer mismatch: the run uses {theirs}, this peer has {ours} ({getattr(tok, 'source', 'built in')})"
        )


def tokenizer_summary(tok: Tokenizer) -> dict[str, Any]:
    return {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "sha256": tok.sha256 or "(none: built in)",
    }


def train_bpe(texts: Iterator[str], *, vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on `texts`; the four SPECIAL_TOKENS take ids 0..3.

    Byte-level: every byte has a symbol in the initial alphabet, so no text is ever unknown.
    """
    if not len(SPECIAL_TOKENS) + BYTE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"vocab_size must be in [{len(SPECIAL_TOKENS) + BYTE_VOCAB}, {MAX_VOCAB}], got {vocab_size}")
    tokenizers = _import_tokenizers()
    tok = _new_byte_level_bpe(None, merges=None, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok.to_str().encode("utf-8"), source="trained")


def byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte value 0..255 (GPT-2's scheme):
    printable Latin-1 bytes stand for themselves, the others are shifted to code points 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(BYTE_VOCAB):
        if b not in symbols:
            symbols[b] = chr(BYTE_VOCAB + shifted)
            shifted += 1
    return [symbols[b] for b in range(BYTE_VOCAB)]


def _new_byte_level_bpe(vocab: dict[str, int] | None, *, merges: list[tuple[str, str]] | None, use_regex: bool) -> Any:
    tokenizers = _import_tokenizers()
    model = tokenizers.models.BPE() if vocab is None else tokenizers.models.BPE(vocab=vocab, merges=merges or [])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _id_array(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    arr = np.asarray(list(ids) if not hasattr(ids, "__array__") else ids).reshape(-1).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token id out of range 0..{vocab_size - 1}: min {arr.min()}, max {arr.max()}")
    return arr


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise TokenizerError("BPE tokenizers need the 'tokenizers' package: pip install 'swarm[bpe]'") from exc
    return tokenizers


def vocab_overrides(tok: Tokenizer, overrides: dict[str, Any]) -> dict[str, Any]:
    """Model overrides with the vocabulary taken from `tok` (a BPE); the byte tokenizer leaves the
    preset's 260. An explicit vocab_size smaller than the tokenizer's is an error."""
    if tok.kind == "byte":
        return dict(overrides)
    if overrides.get("vocab_size", tok.vocab_size) < tok.vocab_size:
        raise TokenizerError(f"vocab_size {overrides['vocab_size']} is smaller than the tokenizer's {tok.vocab_size} ids")
    return {**overrides, "vocab_size": overrides.get("vocab_size", tok.vocab_size)}


# ----- a run's tokenizer on a peer -------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where fetched files live, one folder per sha256 (the same rule as swarm/data/fetch.py)."""
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm" / "shards")


def run_tokenizer_path(sha256: str, cache_dir: str | Path | None = None) -> Path:
    """Where a peer keeps the tokenizer file of hash `sha256`."""
    return Path(cache_dir or default_cache_dir()) / sha256 / TOKENIZER_FILE


def run_tokenizer_source(run: RunConfig, cache_dir: str | Path | None = None) -> str:
    """DataConfig.tokenizer for `run`: its cached tokenizer file, or "" for bytes."""
    return str(run_tokenizer_path(run.tokenizer_sha256, cache_dir)) if run.tokenizer_sha256 else ""


def install_tokenizer(path: str | Path, sha256: str, cache_dir: str | Path | None = None) -> Path:
    """Copy a verified tokenizer file into the cache (atomically), where corpora load it from."""
    dest = run_tokenizer_path(sha256, cache_dir)
    data = Path(path).read_bytes()
    if sha256_bytes(data) != sha256:
        raise TokenizerError(f"{path}: changed on disk, it no longer hashes to {sha256}")
    if not (dest.is_file() and sha256_bytes(dest.read_bytes()) == sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return dest


async def obtain_run_tokenizer(
    run: RunConfig,
    files: FileService | None,
    *,
    local: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """The tokenizer `run` names, checked against its hash, cached and served to other nodes.

    `local`: a tokenizer.json this node already has (e.g. the coordinator's); a different file is
    refused with both hashes. Otherwise the cache, otherwise the swarm (the coordinator first, then
    any node that advertises the file); every copy is verified against the signed hash.
    """
    sha = run.tokenizer_sha256
    if local is not None and (sha or Path(local).is_file()):
        tok = await asyncio.to_thread(load_tokenizer, local, expected_sha256=sha)
        if sha:
            await asyncio.to_thread(install_tokenizer, local, sha, cache_dir)
    elif not sha:
        return ByteTokenizer()
    else:
        dest = run_tokenizer_path(sha, cache_dir)
        if files is None:
            if not dest.is_file():
                raise TokenizerError(f"the run's tokenizer {sha} is not cached at {dest} and this process is not a swarm node")
        else:
            from swarm.net.files import FileFetchError

            try:
                await files.fetch(sha, dest, run.tokenizer_bytes, holders=[run.coordinator] if run.coordinator else [])
            except FileFetchError as exc:
                raise TokenizerError(f"could not get the run's tokenizer {sha} from the swarm: {exc}") from exc
        tok = await asyncio.to_thread(load_tokenizer, dest, expected_sha256=sha)
    if files is not None and sha and not files.serves(sha):
        await files.serve(run_tokenizer_path(sha, cache_dir), sha256=sha)
    if sha:
        logger.info("tokenizer %s: %s, %d ids, sha256 checked, served to the swarm", sha[:12], tok.kind, tok.vocab_size)
    if tok.vocab_size > _model_vocab(run):
        raise TokenizerError(f"the run's model has {_model_vocab(run)} token ids, its tokenizer {tok.vocab_size}")
    return tok


def _model_vocab(run: RunConfig) -> int:
    from models import get_preset

    return get_preset(run.preset, **run.model_overrides).vocab_size
