"""One inner step of one stage: GPipe over several micro-batches in flight.

Every stage of a group reads the same batch (same shard, same seed), cuts it into the same
micro-batches, and so knows the tokens (for T_fixed) and targets without any ids on the wire.
Forward: each micro-batch goes through the stage as soon as its input arrives and its output is
sent at once (sends overlap the next micro-batch's compute). The last stage computes the loss and
sends the gradient back right away; the other stages backpropagate the gradients in micro-batch
order. Gradients accumulate over the micro-batches, each weighted by its share of the batch, so the
step equals one full-batch step of the composed model.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import Stage
from models.subspace import Subspace
from swarm.modes.pipeline.link import LinkError, StageLink
from swarm.modes.pipeline.wire import MessageId, check, encode
from swarm.train.step import NonFiniteLossError, autocast_for


@dataclass
class StageContext:
    stage: Stage
    link: StageLink
    prev: str | None  # peer of the previous stage (None for the first)
    next: str | None  # peer of the next stage (None for the last)
    subspace: Subspace | None  # None: h itself crosses the link
    wire_dtype: str
    micro_batches: int
    timeout_s: float
    device: torch.device
    stop: threading.Event | None = None  # set: give the round up at once (our role changed, or we leave)

    def deadline_s(self, step: int, micro: int) -> float:
        """The first message of a round may wait twice as long: stages start a round when each has
        applied the last one, which takes longer on a slow or busy peer."""
        return 2 * self.timeout_s if step == 0 and micro == 0 else self.timeout_s

    @property
    def width(self) -> int:
        return self.subspace.k if self.subspace is not None else self.stage.cfg.d_model


def stage_step(ctx: StageContext, round_no: int, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Forward and backward of one batch (B, T) through this stage; returns the batch's LM loss
    (as reported by the last stage). Raises LinkError when a neighbour fails."""
    micro_in, micro_tgt = inputs.chunk(ctx.micro_batches), targets.chunk(ctx.micro_batches)
    batch = inputs.shape[0]
    sends: list[concurrent.futures.Future[None]] = []
    saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (what we sent, what we received) per micro-batch
    loss = 0.0
    for m, tokens in enumerate(micro_in):
        tokens = tokens.to(ctx.device)
        received = _receive(ctx, MessageId(round_no, step, m, "fwd"), tokens).requires_grad_(True) if ctx.prev else None
        x = tokens if received is None else ctx.subspace.expand(received, tokens) if ctx.subspace else received
        with autocast_for(ctx.device):
            y = ctx.stage(x)
        if ctx.next is None:  # the last stage: loss now, gradient straight back
            share = tokens.shape[0] / batch
            micro_loss = F.cross_entropy(y.float().flatten(0, 1), micro_tgt[m].to(ctx.device).flatten())
            if not torch.isfinite(micro_loss):
                raise NonFiniteLossError(f"non-finite loss in round {round_no} step {step} micro-batch {m}")
            (micro_loss * share).backward()
            loss += micro_loss.item() * share
            if received is not None and ctx.prev is not None:
                sends.append(_send(ctx, ctx.prev, MessageId(round_no, step, m, "bwd"), received.grad, micro_loss.item()))
        else:
            out = ctx.subspace.compress(y.float(), tokens) if ctx.subspace else y.float()
            sends.append(_send(ctx, ctx.next, MessageId(round_no, step, m, "fwd"), out, None))
            saved.append((out, received))
    for m, (out, received) in enumerate(saved):
        msg_id = MessageId(round_no, step, m, "bwd")
        msg = ctx.link.receive(msg_id, ctx.deadline_s(step, m), ctx.stop, sends)
        grad = check(msg, expect=msg_id, shape=tuple(out.shape), dtype=ctx.wire_dtype)  # type: ignore[arg-type]
        out.backward(grad.to(ctx.device))
        share = micro_in[m].shape[0] / batch
        loss += (msg.loss or 0.0) * share
        if received is not None and ctx.prev is not None:
            sends.append(_send(ctx, ctx.prev, msg_id, received.grad, msg.loss))
    for future in sends:
        future.result(timeout=ctx.timeout_s + 5)
    return loss


def _receive(ctx: StageContext, msg_id: MessageId, tokens: torch.Tensor) -> torch.Tensor:
    msg = ctx.link.receive(msg_id, ctx.deadline_s(msg_id.step, msg_id.micro), ctx.stop)
    shape = (tokens.shape[0], tokens.shape[1], ctx.width)
    return check(msg, expect=msg_id, shape=shape, dtype=ctx.wire_dtype).to(ctx.device)


def _send(
    ctx: StageContext, peer: str, msg_id: MessageId, tensor: torch.Tensor | None, loss: float | None
) -> concurrent.futures.Future[None]:
    if tensor is None:
        raise LinkError(f"no gradient to send back for micro-batch {msg_id.micro}")
    return ctx.link.send(peer, encode(msg_id, tensor, ctx.wire_dtype, loss), ctx.timeout_s)
