"""Plain mean of decoded pseudo-gradients: Delta = (1/R) * sum_r Delta_hat_r.

R is the number of payloads, never the number of peers that happened to select a given
coordinate: a coordinate chosen by one replica of four moves by a quarter of that replica's
value. Dividing per coordinate (a known bug in public code) inflates rare coordinates up to
R times. The sum runs in list order in fp32; the caller fixes that order (sorted by sender)
so every peer gets bit-identical results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch


def mean_of_payloads(decoded: Sequence[Mapping[str, torch.Tensor]], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Mean over payloads of each named tensor; every payload must carry every name."""
    if not decoded:
        raise ValueError("cannot average zero payloads")
    replicas = len(decoded)
    result = {}
    for name in names:
        missing = [i for i, payload in enumerate(decoded) if name not in payload]
        if missing:
            raise ValueError(f"tensor {name!r} missing from payloads at positions {missing}")
        total = decoded[0][name].detach().to("cpu", torch.float32).clone()
        for payload in decoded[1:]:
            term = payload[name]
            if term.shape != total.shape:
                raise ValueError(f"tensor {name!r}: shape {tuple(term.shape)} != {tuple(total.shape)}")
            total.add_(term.detach().to("cpu", torch.float32))
        total.div_(replicas)
        if not torch.isfinite(total).all():
            raise ValueError(f"mean of {name!r} is not finite")
        result[name] = total
    return result


class SlotMean:
    """Per-slot mean, accumulated one payload at a time: Δ_slot = (1/R_slot)·Σ Δ̂ over the payloads
    that cover the slot. A slot nobody covered is absent from the result (left unchanged).

    Memory is one fp32 accumulator per covered slot, O(params) whatever the number of payloads;
    adding in a fixed order (the manifest's) gives bit-identical sums on every machine, because
    each element's additions happen in that order whatever the thread count.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, payload: Mapping[str, torch.Tensor], scales: Mapping[str, float] | None = None) -> None:
        """Add one contribution; `scales` multiplies named tensors first (robust clipping)."""
        for name in sorted(payload):
            if name not in self.shapes:
                raise ValueError(f"tensor {name!r} is not a slot of this model")
            term = payload[name].detach().to("cpu", torch.float32)
            if scales and name in scales:
                term = term * scales[name]
            if tuple(term.shape) != tuple(self.shapes[name]):
                raise ValueError(f"tensor {name!r}: shape {tuple(term.shape)} != {tuple(self.shapes[name])}")
            if name in self.sums:
                self.sums[name].add_(term)
            else:
                self.sums[name] = term.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The per-slot means (consumes the sums)."""
        result = {}
        for name in sorted(self.sums):
            total = self.sums[name].div_(self.counts[name])
            if not torch.isfinite(total).all():
                raise ValueError(f"mean of {name!r} is not finite")
            result[name] = total
        self.sums = {}
        return result
