"""swarm-tokenizer: train a byte-level BPE tokenizer on a corpus, or describe a tokenizer.json."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from swarm.data.corpus import CorpusError, DataConfig, iter_documents
from swarm.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_summary, train_bpe

PROG = "swarm-tokenizer"
_INFO_SAMPLE_BYTES = 2**20  # compression is measured on the first MiB of --data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Byte-level BPE tokenizers for a run (see docs/data.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a BPE on a corpus and write its tokenizer.json")
    train.add_argument("--vocab", type=int, default=8192, help="vocabulary size including 4 specials (default 8192)")
    train.add_argument("--data", default="stdlib", help="corpus: 'stdlib', a file, a directory or a glob (as swarm-train)")
    train.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")
    train.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of the corpus")
    train.add_argument("--out", default="tokenizer.json", help="file to write (default tokenizer.json)")
    info = sub.add_parser("info", help="vocabulary, specials, sha256 (and compression on --data)")
    info.add_argument("file", help="a tokenizer.json, or 'byte'")
    info.add_argument("--data", default=None, help="measure tokens per byte on the first MiB of this corpus")
    return parser


def _train(args: argparse.Namespace) -> int:
    cfg = DataConfig(source=args.data, text_field=args.text_field, max_bytes=args.max_bytes)
    start = time.perf_counter()
    texts = (doc.decode("utf-8", errors="replace") for doc in iter_documents(cfg))
    tok = train_bpe(texts, vocab_size=args.vocab)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tok.to_json())
    print(f"wrote {out}: vocab {tok.vocab_size}, sha256 {tok.sha256} ({time.perf_counter() - start:.1f} s)")
    return 0


def _info(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.file)
    for key, value in tokenizer_summary(tok).items():
        print(f"{key:>10}  {value}")
    if args.data:
        sample = b""
        for doc in iter_documents(DataConfig(source=args.data, max_bytes=_INFO_SAMPLE_BYTES)):
            sample += doc
        ids = tok.encode_bytes(sample)
        print(f"{'bytes/tok':>10}  {len(sample) / max(len(ids), 1):.2f} on the first {len(sample):,} bytes of {args.data}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _info(args)
    except (TokenizerError, CorpusError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
