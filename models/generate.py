"""Autoregressive sampling from a LanguageModel."""

from __future__ import annotations

import torch

from models.transformer import LanguageModel


@torch.no_grad()
def generate(
    model: LanguageModel,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``tokens`` (B, T) long; returns (B, T + new).

    The model sees at most its last ``max_seq_len`` tokens. ``temperature=0`` means greedy
    decoding; ``top_k`` keeps only the k most likely tokens. Sampling draws from ``generator``
    (which must live on the model's device), so a seeded generator gives repeatable output.
    The model runs in eval mode and gets its previous train/eval mode back afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = tokens[:, -model.cfg.max_seq_len :]
            logits = model(context).logits[:, -1, :].float()  # (B, V)
            tokens = torch.cat((tokens, _sample(logits, temperature, top_k, generator)), dim=1)
    finally:
        model.train(was_training)
    return tokens


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One next token per row of ``logits`` (B, V) -> (B, 1) long."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
