"""swarm-presets: the model presets with their sizes (analytic counts, instant even for 1b)."""

from __future__ import annotations

import argparse
import sys

from models import PRESETS, ModelConfig, count_active_parameters, count_parameters

_COLUMNS = ("preset", "params", "active", "layers", "d_model", "heads", "ffn", "experts", "context")


def human_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def preset_row(name: str, cfg: ModelConfig) -> tuple[str, ...]:
    experts = f"{cfg.n_experts} (top-{cfg.top_k})" if cfg.is_moe else "-"
    ffn = cfg.expert_hidden if cfg.is_moe else cfg.d_ff
    return (
        name,
        human_count(count_parameters(cfg)),
        human_count(count_active_parameters(cfg)),
        str(cfg.n_layers),
        str(cfg.d_model),
        str(cfg.n_heads),
        str(ffn),
        experts,
        str(cfg.max_seq_len),
    )


def format_table(rows: list[tuple[str, ...]]) -> str:
    table = [_COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="swarm-presets",
        description="List model presets: total and active (per-token, MoE) parameters, shape, context length in bytes. "
        "'ffn' is the SwiGLU hidden width (per expert for MoE).",
    ).parse_args(argv)
    print(format_table([preset_row(name, cfg) for name, cfg in PRESETS.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
