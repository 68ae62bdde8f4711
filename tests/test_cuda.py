"""The CUDA paths, on a GPU: the solo trainer in bf16, a peer's round, a pipeline stage on the
device, and the CUDA generator's state in checkpoints.

Skipped where torch sees no CUDA device (CI, this project's machines); `launch/gpu_check.sh` runs
them on a lent GPU beside `swarm-bench gpu` (issue 25)."""

from __future__ import annotations

import pytest
import torch

from models import build_model, build_stage, get_preset, split_stages
from swarm.codec import SlotMean
from swarm.data import DataConfig
from swarm.modes import default_outer, mode_for
from swarm.modes.replica import Replica, initial_state
from swarm.net.transfer import Traffic
from swarm.round.payloads import PayloadEncoder, PayloadStore
from swarm.run import RunConfig
from swarm.train.checkpoint import capture_rng_state, restore_rng_state
from swarm.train.solo import TrainConfig, run_solo

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run launch/gpu_check.sh on one (issue 25)"
)
CUDA = torch.device("cuda")


def run_config() -> RunConfig:
    return RunConfig(
        run_id="cuda-test",
        preset="nano",
        data_source="stdlib",
        batch_size=4,
        seq_len=64,
        inner_steps=3,
        warmup_steps=3,
        eval_batches=1,
        mode="sparseloco",
        outer=default_outer("sparseloco"),
    )


def test_the_solo_trainer_runs_in_bf16_on_the_gpu_and_keeps_fp32_weights():
    cfg = TrainConfig(
        preset="nano",
        data=DataConfig(source="stdlib"),
        batch_size=4,
        seq_len=64,
        steps=6,
        eval_every=0,
        eval_batches=1,
        out_dir=None,
        device="cuda",
    )
    result = run_solo(cfg)
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.final_train_loss)) and result.tokens_per_s_median > 0
    assert result.final_eval_loss is not None and result.final_eval_loss < 6.0


def test_a_gpu_peers_round_matches_a_cpu_peers_and_the_agreed_state_stays_on_the_cpu_in_fp32():
    """The same θ(0), data shard and seed on both devices: bf16 autocast on the GPU gives a
    pseudo-gradient close to the CPU's fp32 one (not equal); encoding, decoding and the outer step
    run on the CPU, so every node applies a round's payloads to the same bits whatever trained them."""
    run = run_config()
    gpu, cpu = Replica(run, shard=0, device=CUDA), Replica(run, shard=0, device=torch.device("cpu"))
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    on_gpu, on_cpu = gpu.train_round(initial_state(run)), cpu.train_round(initial_state(run))
    assert on_gpu is not None and on_cpu is not None
    for name, delta in on_gpu.delta.items():
        assert delta.device.type == "cpu" and delta.dtype == torch.float32
        error = (delta - on_cpu.delta[name]).norm() / on_cpu.delta[name].norm().clamp_min(1e-12)
        assert error < 0.2, f"{name}: the GPU's pseudo-gradient is {error:.2f} of the CPU's away from it"
    shapes = {n: tuple(p.shape) for n, p in sorted(gpu.model.named_parameters())}
    store = PayloadStore(run, shapes, Traffic())
    payloads = [PayloadEncoder(run, s).encode(w.delta, 0) for s, w in (("gpu", on_gpu), ("cpu", on_cpu))]
    states = [initial_state(run), initial_state(run)]
    mode = mode_for(run)
    for state in states:
        acc = SlotMean(shapes)
        for sender, payload in zip(("gpu", "cpu"), payloads):
            acc.add(store.decode(payload.data, sender=sender, round_no=0))
        mode.outer_step(state, acc.mean())
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.params.values())
    assert states[0].hash == states[1].hash and states[0].round == 1
    states[0].load_into(gpu.model)  # θ(1) goes onto the device exactly
    assert all(torch.equal(p.detach().cpu(), states[1].params[n]) for n, p in gpu.model.named_parameters())


def test_a_pipeline_stage_on_the_gpu_computes_what_the_cpu_stage_does():
    cfg = get_preset("nano")
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = split_stages(model, [2])
    weights = dict(model.named_parameters())
    x_cpu, x_gpu = tokens, tokens.to(CUDA)
    for index in range(2):
        _, stage = build_stage(cfg, [2], index, device=CUDA)
        assert all(p.device.type == "cuda" for p in stage.parameters())
        with torch.no_grad():
            for name, p in stage.named_parameters():
                p.copy_(weights[name])
            x_cpu, x_gpu = reference[index](x_cpu), stage(x_gpu)
        assert torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-3, rtol=1e-3), f"stage {index}"


def test_a_checkpoint_restores_the_cuda_generator():
    torch.rand(1, device=CUDA)  # CUDA initialised: its generator is captured
    state = capture_rng_state()
    assert "torch_cuda" in state
    first = torch.rand(8, device=CUDA)
    restore_rng_state(state)
    assert torch.equal(torch.rand(8, device=CUDA), first)
