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
