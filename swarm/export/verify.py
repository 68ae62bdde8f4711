"""Load an exported folder with transformers and compare its logits with our model's (needs the
``transformers`` package; used by ``swarm-export --check`` and the round trip tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models import LanguageModel
from swarm.export.hf import ExportError

FP32_TOLERANCE = 1e-4  # max abs logit difference; observed ~4e-7 on the nano presets (only op order differs)


@dataclass
class Verification:
    architecture: str
    max_abs_diff: float  # over every logit of the probe batch
    max_abs_logit: float
    ok: bool


def verify_export(out_dir: str | Path, model: LanguageModel, *, seq_len: int = 64, seed: int = 0) -> Verification:
    """Logits of `model` and of the transformers model in `out_dir` on the same random batch."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ExportError("checking an export needs the 'transformers' package (pip install transformers)") from exc
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, min(seq_len, cfg.max_seq_len)), generator=generator)  # (B, T)
    model = model.float().eval()
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = hf(tokens).logits
    diff = float((ours - theirs).abs().max())
    return Verification(type(hf).__name__, diff, float(ours.abs().max()), diff <= FP32_TOLERANCE)
