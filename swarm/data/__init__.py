"""Data pipeline: byte tokenizer, corpus loading with a held-out split, shard-disjoint batch streams."""

from swarm.data.corpus import Corpus, CorpusError, DataConfig, load_corpus
from swarm.data.sampler import BatchStream, eval_batches
from swarm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "BatchStream",
    "ByteTokenizer",
    "Corpus",
    "CorpusError",
    "DataConfig",
    "eval_batches",
    "load_corpus",
]
