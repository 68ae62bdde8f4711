"""Pipeline stages: contiguous slices of a LanguageModel that share its parameters.

A stage registers the model's own submodules under the model's own names (``tok_emb``,
``blocks.{i}`` with the global layer index, ``norm``, ``head``), so ``stage.named_parameters()``
and ``stage.state_dict()`` keys are a subset of the model's, with identical names and the very same
tensor objects. A stage can therefore own an optimizer over ``stage.parameters()`` and sync its
slice with the same slice of every other replica by name.

With ``tie_embeddings=True`` the last stage also holds ``tok_emb`` (its weight is the head), so the
first and last stage share that one tensor; on separate machines its two gradients must be summed.
The presets untie embeddings to avoid this.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import RotaryEmbedding
from models.transformer import LanguageModel, check_tokens, run_blocks


class Stage(nn.Module):
    """Blocks ``[start, end)`` of a model, plus the embedding if first and norm + head if last.

    forward: first stage takes tokens (B, T) long, the others hidden (B, T, C); the last returns
    logits (B, T, V), the others hidden (B, T, C). ``aux_losses()`` gives the MoE losses of the last
    forward, already divided by the model's layer count: summed over stages they equal the model's.
    """

    def __init__(self, model: LanguageModel, start: int, end: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.start, self.end = start, end
        self.is_first, self.is_last = first, last
        self.rope = model.rope  # buffers only, nothing to train or sync
        self.tok_emb: nn.Embedding | None = None
        self.norm: nn.Module | None = None
        self.head: nn.Linear | None = None
        if first or (last and model.head is None):
            self.tok_emb = model.tok_emb
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, end)})
        if last:
            self.norm = model.norm
            self.head = model.head
        zero = torch.zeros((), device=model.tok_emb.weight.device)
        self._aux: tuple[torch.Tensor, torch.Tensor] = (zero, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None and self.is_first:
            check_tokens(x, self.cfg)
            x = self.tok_emb(x)  # (B, T, C)
        elif x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"stage [{self.start}, {self.end}) expects hidden (B, T, {self.cfg.d_model}), got {tuple(x.shape)}")
        x, balance, z = run_blocks(self.blocks.values(), x, self.rope, self.cfg.n_layers)
        self._aux = (balance, z)
        if self.norm is None:
            return x
        head = self.head if self.head is not None else self.tok_emb
        assert head is not None  # last stage: one of the two is always set
        return F.linear(self.norm(x), head.weight)  # (B, T, V)

    def aux_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(balance, z)`` of the last forward (0-dim, in the graph); zeros for dense models."""
        return self._aux

    def weighted_aux_loss(self) -> torch.Tensor:
        """``balance_loss_coef * balance + z_loss_coef * z``: this stage's share of the total loss,
        to backpropagate together with the incoming activation gradient."""
        balance, z = self._aux
        return self.cfg.balance_loss_coef * balance + self.cfg.z_loss_coef * z

    def extra_repr(self) -> str:
        return f"layers=[{self.start}, {self.end}), first={self.is_first}, last={self.is_last}"


def split_stages(model: LanguageModel, boundaries: Sequence[int]) -> list[Stage]:
    """Cut ``model`` at the layer indices ``boundaries`` (strictly increasing, in 1..n_layers-1).

    ``n_layers=4, boundaries=[1, 3]`` gives embedding + blocks[0:1], blocks[1:3], and
    blocks[3:4] + norm + head. ``boundaries=[]`` gives one stage that is the whole model.
    """
    n = model.cfg.n_layers
    cuts = [int(b) for b in boundaries]
    if any(b <= a for a, b in itertools.pairwise(cuts)) or any(not 0 < b < n for b in cuts):
        raise ValueError(f"boundaries must be strictly increasing layer indices in 1..{n - 1}, got {list(boundaries)}")
    edges = [0, *cuts, n]
    last = len(edges) - 2
    return [Stage(model, edges[i], edges[i + 1], first=i == 0, last=i == last) for i in range(len(edges) - 1)]


def build_stage(
    cfg: ModelConfig, boundaries: Sequence[int], index: int, *, device: torch.device | str = "cpu"
) -> tuple[LanguageModel, Stage]:
    """Stage ``index`` of a model cut at ``boundaries``, with only the stage's own tensors in memory.

    The rest of the model is a skeleton on the meta device (every name and shape, no storage), so a
    peer holding one stage of a model larger than its memory never builds the whole. The stage's
    parameters are allocated on ``device`` uninitialised: load its weights before use (a swarm stage
    loads the agreed state's part every round). Returns ``(skeleton, stage)``; the skeleton's
    parameters outside the stage stay on the meta device.
    """
    with torch.device("meta"):
        model = LanguageModel(cfg)
    stage = split_stages(model, boundaries)[index]
    stage.to_empty(device=device)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
    model.rope = stage.rope = rope
    zero = torch.zeros((), device=device)
    stage._aux = (zero, zero)
    return model, stage
