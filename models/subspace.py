"""Subspace compression of the residual stream between pipeline stages (single-device maths only).

A fixed orthonormal ``U`` (d x k, k = d / ratio) and a fixed token embedding ``T_fixed`` (V x d) are
derived from the run seed, identically on every machine. The model's input embedding becomes
``T_fixed[x] + E[x]``; every matrix that writes into the residual stream is kept in span(U)
(``E <- E U U^T``, attention ``out <- U U^T out``, FFN ``w_down <- U U^T w_down``). Then the residual
stream after any constrained block is ``T_fixed[x] + (something in span(U))``, so a stage can send
``c = U^T (h - T_fixed[x])`` (k numbers per token) and the next stage rebuilds ``h = U c + T_fixed[x]``
exactly. The last block's output never crosses a link, so it is exempt. Gradients go back the same
way: dL/dc = U^T dL/dh, also k numbers per token.

With ``fold_embedding`` the learnable embedding is not held in span(U): its part outside span(U),
``E (I - U U^T)``, is folded into the link's fixed table for the round (``begin_round``), so the link
uses ``T_fixed + E_r (I - U U^T)`` in place of ``T_fixed``. A stage's own updates of E stay in span(U)
(``project_model_`` keeps the round's off-span part), so the link is exact all round, while the
off-span change that unconstrained full replicas (and top-k) make to E survives the outer step
instead of being projected away: the model keeps a full-rank token embedding.

Nothing here knows about networks; swarm/modes/pipeline/ carries ``c`` and its gradient between peers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from models.transformer import LanguageModel

_STREAM_SALT = 0x5B5F_AC3D  # keeps U and T_fixed independent of the model init drawn from the same seed


@dataclass(frozen=True)
class SubspaceConfig:
    """Shape of the compression; ``ratio`` = d / k (1 = no compression)."""

    d_model: int
    vocab_size: int
    ratio: int
    seed: int = 0  # the run seed
    t_fixed_std: float = 0.02  # the scale of the learnable embedding at init, so neither part dominates
    fold_embedding: bool = False  # E's part outside span(U) joins the link's fixed table instead of being projected

    def __post_init__(self) -> None:
        if self.ratio < 1 or self.d_model < 1 or self.vocab_size < 1:
            raise ValueError(f"ratio, d_model and vocab_size must be >= 1, got {self.ratio}, {self.d_model}, {self.vocab_size}")
        if self.ratio > self.d_model:
            raise ValueError(f"ratio {self.ratio} leaves no dimension of d_model {self.d_model}")

    @property
    def k(self) -> int:
        return self.d_model // self.ratio


def constrained_names(n_layers: int) -> list[str]:
    """Parameters that write into the residual stream before the last block (kept in span(U))."""
    return ["tok_emb.weight", *writer_names(n_layers)]


def writer_names(n_layers: int) -> list[str]:
    """The blocks' residual writers before the last block (the last block's output is never sent)."""
    names = []
    for i in range(n_layers - 1):
        names += [f"blocks.{i}.attn.out.weight", f"blocks.{i}.ffn.w_down.weight"]
    return names


class Subspace:
    """``U`` (d, k) and ``T_fixed`` (V, d), float32, derived from the run seed with a CPU generator."""

    def __init__(self, cfg: SubspaceConfig) -> None:
        self.cfg = cfg
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed ^ _STREAM_SALT)
        gauss = torch.randn(cfg.d_model, cfg.k, generator=gen, dtype=torch.float64)
        self.U = _orthonormal_columns(gauss).to(torch.float32)  # (d, k)
        t_fixed = torch.randn(cfg.vocab_size, cfg.d_model, generator=gen, dtype=torch.float64) * cfg.t_fixed_std
        self.T_fixed = t_fixed.to(torch.float32)  # (V, d)
        self.drift: torch.Tensor | None = None  # E_r (I - U U^T) of the round (fold_embedding only)
        self._folded: torch.Tensor | None = None  # T_fixed + drift

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def table(self) -> torch.Tensor:
        """What the link subtracts and adds back per token: T_fixed, plus the round's drift when folding."""
        return self._folded if self._folded is not None else self.T_fixed

    @property
    def fold(self) -> bool:
        return self.cfg.fold_embedding

    def held_names(self, n_layers: int) -> list[str]:
        """Parameters the agreed state keeps in span(U): every writer, and E unless it is folded."""
        return writer_names(n_layers) if self.fold else constrained_names(n_layers)

    @torch.no_grad()
    def begin_round(self, tok_emb: torch.Tensor, device: torch.device | None = None) -> None:
        """Fix the link's table for a round from the round's agreed embedding ``E_r`` (every stage
        holds the same one). Without folding the table is ``T_fixed`` and this only moves it."""
        device = device or tok_emb.device
        self.U, self.T_fixed = self.U.to(device), self.T_fixed.to(device)
        if not self.fold:
            return
        e = tok_emb.detach().to(device=device, dtype=torch.float64)
        u = self.U.double()
        self.drift = (e - (e @ u) @ u.T).to(self.T_fixed.dtype)
        self._folded = self.T_fixed + self.drift

    def digest(self) -> str:
        """sha256 over the bytes of U and T_fixed: peers compare it to know they derived the same ones."""
        h = hashlib.sha256()
        for t in (self.U, self.T_fixed):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device: torch.device) -> Subspace:
        self.U, self.T_fixed = self.U.to(device), self.T_fixed.to(device)
        if self.drift is not None and self._folded is not None:
            self.drift, self._folded = self.drift.to(device), self._folded.to(device)
        return self

    # ----- the link ------------------------------------------------------------------------------

    def compress(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``c = U^T (h - T[tokens])``: (B, T, d) -> (B, T, k), differentiable (T: the round's table)."""
        return (h - self.table[tokens]) @ self.U

    def expand(self, c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``h = U c + T[tokens]``: (B, T, k) -> (B, T, d), differentiable."""
        return c @ self.U.T + self.table[tokens]

    # ----- keeping the model in span(U) ----------------------------------------------------------

    @torch.no_grad()
    def project_(self, params: dict[str, torch.Tensor], n_layers: int, names: list[str] | None = None) -> None:
        """Project the matrices of ``names`` (default: every constrained one) present in ``params``
        onto span(U), in place: for gradients and updates, which have no off-span part to keep."""
        for name in constrained_names(n_layers) if names is None else names:
            w = params.get(name)
            if w is None:
                continue
            u = self.U.to(device=w.device, dtype=w.dtype)
            if name == "tok_emb.weight":
                w.copy_((w @ u) @ u.T)  # rows of E are residual vectors: E U U^T
            else:
                w.copy_(u @ (u.T @ w))  # output rows of a Linear (d, in): U U^T W

    @torch.no_grad()
    def project_writers_(self, model: nn.Module, n_layers: int) -> None:
        """Keep a training model's writers (W_o, W_2) in span(U), leaving its embedding free."""
        self.project_(dict(model.named_parameters()), n_layers, writer_names(n_layers))

    @torch.no_grad()
    def project_model_(self, model: nn.Module, n_layers: int) -> None:
        """Keep a training model's writers in span(U) (after an optimizer step). When folding, E
        keeps the round's off-span part (``begin_round``) and only its change is projected."""
        params: dict[str, torch.Tensor] = dict(model.named_parameters())
        self.project_(params, n_layers, writer_names(n_layers))
        e = params.get("tok_emb.weight")
        if e is None:
            return
        if not self.fold:
            self.project_(params, n_layers, ["tok_emb.weight"])
        elif self.drift is not None:
            u = self.U.to(device=e.device, dtype=e.dtype)
            e.copy_((e @ u) @ u.T + self.drift.to(device=e.device, dtype=e.dtype))

    def attach(self, model: LanguageModel) -> None:
        """Add ``T_fixed[x]`` to the token embedding of ``model`` (and of every stage sharing it)."""
        table = self.T_fixed.to(model.tok_emb.weight.device)

        def add_fixed(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output + table[inputs[0]]

        model.tok_emb.register_forward_hook(add_fixed)


def _orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt, column by column in float64: the same bits wherever it runs, unlike a
    LAPACK QR whose blocking depends on the library and thread count."""
    q = a.clone()
    for j in range(q.shape[1]):
        v = q[:, j]
        for i in range(j):
            v = v - (q[:, i] * v).sum() * q[:, i]
        q[:, j] = v / v.norm()
    return q
