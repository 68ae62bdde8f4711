"""Our decoder as a Hugging Face transformers checkpoint: Llama (dense) or Mixtral (MoE).

Both targets compute exactly what ``models.LanguageModel`` computes (pre-norm RMSNorm blocks,
SwiGLU, RoPE, no biases; Mixtral's router is softmax over all experts, top-k, renormalised, like
``models.moe.route``), so the mapping is a renaming plus two exact rearrangements:

* the fused ``attn.qkv`` is split into ``q_proj``, ``k_proj``, ``v_proj``;
* RoPE: we rotate interleaved channel pairs ``(2i, 2i+1)`` of a head, transformers rotates
  ``(i, i + head_dim/2)``. Permuting the rows of ``q_proj`` and ``k_proj`` within each head (even
  channels first, then odd ones) turns one convention into the other; q·k is unchanged because
  both sides move the same way, and v and the output projection are untouched.

The MoE experts are written in the classic Mixtral layout (``block_sparse_moe.experts.{e}.w1/w2/w3``,
w1 = gate, w3 = up, w2 = down), which every transformers version loads (v5 fuses them on load).
Nothing here imports transformers: an export needs only torch and safetensors (and the
``tokenizers`` package for the tokenizer files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models import ModelConfig
from swarm.data.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16")}


class ExportError(ValueError):
    """The source cannot be exported (unknown layout, wrong tensors, tokenizer mismatch)."""


def rope_permutation(head_dim: int) -> torch.Tensor:
    """Row order that maps our interleaved RoPE pairs onto transformers' half-split pairs."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _permute_heads(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    perm = rope_permutation(head_dim)
    d_in = weight.shape[1]
    return weight.view(n_heads, head_dim, d_in)[:, perm, :].reshape(n_heads * head_dim, d_in)  # (C, C)


def hf_tensors(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``state_dict`` (names as in models/transformer.py) renamed and rearranged for transformers."""
    _check_names(cfg, params)
    C, H, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": params["tok_emb.weight"],
        "model.norm.weight": params["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = params[ours + "attn.qkv.weight"].split(C, dim=0)  # (C, C) each
        out[theirs + "self_attn.q_proj.weight"] = _permute_heads(q, H, hd)
        out[theirs + "self_attn.k_proj.weight"] = _permute_heads(k, H, hd)
        out[theirs + "self_attn.v_proj.weight"] = v
        out[theirs + "self_attn.o_proj.weight"] = params[ours + "attn.out.weight"]
        out[theirs + "input_layernorm.weight"] = params[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = params[ours + "ffn_norm.weight"]
        if cfg.is_moe:
            moe = theirs + "block_sparse_moe."
            out[moe + "gate.weight"] = params[ours + "ffn.router.weight"]
            for e in range(cfg.n_experts):
                expert = f"{ours}ffn.experts.{e}."
                out[f"{moe}experts.{e}.w1.weight"] = params[expert + "w_gate.weight"]
                out[f"{moe}experts.{e}.w3.weight"] = params[expert + "w_up.weight"]
                out[f"{moe}experts.{e}.w2.weight"] = params[expert + "w_down.weight"]
        else:
            out[theirs + "mlp.gate_proj.weight"] = params[ours + "ffn.w_gate.weight"]
            out[theirs + "mlp.up_proj.weight"] = params[ours + "ffn.w_up.weight"]
            out[theirs + "mlp.down_proj.weight"] = params[ours + "ffn.w_down.weight"]
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}


def _check_names(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> None:
    from models import LanguageModel

    with torch.device("meta"):  # shapes only, no memory
        expected = {n: tuple(t.shape) for n, t in LanguageModel(cfg).state_dict().items()}
    got = {n: tuple(t.shape) for n, t in params.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:5]
        unexpected = sorted(set(got) - set(expected))[:5]
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:5]
        raise ExportError(f"tensors do not fit the model config: missing {missing}, unexpected {unexpected}, wrong shape {wrong}")


def hf_config(cfg: ModelConfig, tok: Tokenizer, *, dtype: str = "fp32") -> dict[str, Any]:
    """config.json for LlamaForCausalLM (dense) or MixtralForCausalLM (MoE)."""
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,  # plain multi-head attention, no grouped KV
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "use_cache": True,
        "torch_dtype": _DTYPES[dtype][1],
    }
    if not cfg.is_moe:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "intermediate_size": cfg.d_ff,
            "mlp_bias": False,
        }
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **common,
        "intermediate_size": cfg.expert_hidden,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        # Fine-tuning with output_router_logits=True adds Mixtral's balance loss with this weight; it
        # has no z-loss (see docs/export.md for how its balance loss differs from ours).
        "output_router_logits": False,
        "router_aux_loss_coef": cfg.balance_loss_coef,
    }


def _tokenizer_files(tok: Tokenizer, cfg: ModelConfig) -> dict[str, str]:
    names = _special_names(tok)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tok.bos_id],
        "eos_token": names[tok.eos_id],
        "pad_token": names[tok.pad_id],
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    specials = {"bos_token": names[tok.bos_id], "eos_token": names[tok.eos_id], "pad_token": names[tok.pad_id]}
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    }
    return {
        "tokenizer.json": tok.to_json(),
        "tokenizer_config.json": _dump(tokenizer_config),
        "special_tokens_map.json": _dump(specials),
        "generation_config.json": _dump(generation),
    }


def _special_names(tok: Tokenizer) -> dict[int, str]:
    from swarm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, BPETokenizer

    if not isinstance(tok, BPETokenizer):
        return {tok.bos_id: BOS_TOKEN, tok.eos_id: EOS_TOKEN, tok.pad_id: PAD_TOKEN}
    names = {}
    for token_id in (tok.bos_id, tok.eos_id, tok.pad_id):
        name = tok.token(token_id)
        if name is None:
            raise ExportError(f"tokenizer has no token for special id {token_id}")
        names[token_id] = name
    return names


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_hf_folder(
    out_dir: str | Path,
    *,
    cfg: ModelConfig,
    params: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    dtype: str = "fp32",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write config.json, model.safetensors, tokenizer and generation files to `out_dir`.

    Written to a temporary sibling and renamed into place, so `out_dir` is either the old folder
    or a complete new one. `provenance` (run id, round/step, state hash) goes into the safetensors
    metadata and swarm_export.json.
    """
    if dtype not in _DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    out_dir = Path(out_dir)
    config = hf_config(cfg, tokenizer, dtype=dtype)
    torch_dtype = _DTYPES[dtype][0]
    tensors = {n: t.to(torch_dtype).contiguous() for n, t in hf_tensors(cfg, params).items()}
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    files = {"config.json": _dump(config), **_tokenizer_files(tokenizer, cfg)}
    files["swarm_export.json"] = _dump(
        {"model_config": cfg.to_dict(), "tokenizer_sha256": tokenizer.sha256, **(provenance or {})}
    )
    for name, text in files.items():
        (tmp / name).write_text(text)
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir
