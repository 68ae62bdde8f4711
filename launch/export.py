"""swarm-export: a finished run (solo checkpoint or a swarm's saved state) as a transformers model folder."""

from __future__ import annotations

import argparse
import sys

from swarm.data.tokenizer import TokenizerError
from swarm.export import ExportError, load_source, write_hf_folder

PROG = "swarm-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a Hugging Face transformers model folder (config.json, model.safetensors, tokenizer and "
        "generation files): Llama for dense presets, Mixtral for MoE presets. See docs/export.md.",
    )
    parser.add_argument(
        "checkpoint", help="solo checkpoint (or its run's out dir), a coordinator's state dir, or a saved state dir"
    )
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--run", default=None, help="run.json for a saved state dir that has none in its parent")
    parser.add_argument("--tokenizer", default=None, help="the run's tokenizer.json if it is not next to the checkpoint")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype of the export")
    parser.add_argument("--check", action="store_true", help="load the export with transformers and compare logits")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = load_source(args.checkpoint, run_file=args.run)
        tokenizer = source.tokenizer(args.tokenizer)
        out = write_hf_folder(
            args.out_dir,
            cfg=source.cfg,
            params=source.params,
            tokenizer=tokenizer,
            dtype=args.dtype,
            provenance=source.provenance,
        )
    except (ExportError, TokenizerError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    arch = "MixtralForCausalLM" if source.cfg.is_moe else "LlamaForCausalLM"
    where = ", ".join(f"{k} {v}" for k, v in source.provenance.items() if k in ("source", "run_id", "round", "step"))
    print(f"wrote {out} ({arch}, {args.dtype}, {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids; {where})")
    if args.check:
        from swarm.export.verify import verify_export

        try:
            result = verify_export(out, source.model())
        except ExportError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        verdict = "ok" if result.ok else "MISMATCH"
        print(f"check: transformers {result.architecture} logits max abs diff {result.max_abs_diff:.2e} ({verdict})")
        return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
