"""Pipeline stages share the model's parameters and compose to exactly the full forward."""

import pytest
import torch

from models import build_model, build_stage, freeze_experts, get_preset, is_expert_parameter, split_stages


def _run(stages: list, tokens: torch.Tensor) -> torch.Tensor:
    x = tokens
    for stage in stages:
        x = stage(x)
    return x


CASES = [("nano", False), ("nano", True), ("moe-nano", False), ("moe-nano", True)]


@pytest.mark.parametrize("name, tie", CASES)
def test_composed_stages_equal_full_model_exactly(name: str, tie: bool) -> None:
    model = build_model(get_preset(name, tie_embeddings=tie), seed=0)
    tokens = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    stages = split_stages(model, [1, 3])
    assert [(s.start, s.end, s.is_first, s.is_last) for s in stages] == [
        (0, 1, True, False),
        (1, 3, False, False),
        (3, 4, False, True),
    ]
    hidden = stages[0](tokens)
    assert hidden.shape == (2, 24, model.cfg.d_model)
    assert torch.equal(_run(stages, tokens), full.logits)
    balance = torch.stack([s.aux_losses()[0] for s in stages]).sum()
    z = torch.stack([s.aux_losses()[1] for s in stages]).sum()
    assert torch.allclose(balance, full.balance_loss) and torch.allclose(z, full.z_loss)
    assert torch.equal(_run(split_stages(model, []), tokens), full.logits)


@pytest.mark.parametrize("name, tie", CASES)
def test_stage_parameters_are_the_models(name: str, tie: bool) -> None:
    model = build_model(get_preset(name, tie_embeddings=tie))
    model_params = dict(model.named_parameters())
    stages = split_stages(model, [2])
    seen: list[str] = []
    for stage in stages:
        for pname, param in stage.named_parameters():
            assert param is model_params[pname], pname
            seen.append(pname)
        assert set(stage.state_dict()) <= set(model.state_dict())
    assert set(seen) == set(model_params)
    shared = sorted(n for n in set(seen) if seen.count(n) > 1)
    assert shared == (["tok_emb.weight"] if tie else [])
    assert "blocks.3.attn.qkv.weight" in dict(stages[1].named_parameters())


def test_stage_gradients_match_full_model() -> None:
    cfg = get_preset("moe-nano")
    model, twin = build_model(cfg, seed=0), build_model(cfg, seed=0)
    tokens = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens).loss.backward()
    stages = split_stages(twin, [1, 3])
    logits = _run(stages, tokens)
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    (lm + sum(s.weighted_aux_loss() for s in stages)).backward()
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        other = twin_params[name].grad
        if param.grad is None:
            assert other is None, name
        else:
            assert other is not None and torch.allclose(param.grad, other, atol=1e-6), name


def test_stage_owns_an_optimizer_and_freezing_works_by_name() -> None:
    model = build_model(get_preset("moe-nano"), seed=0)
    first, last = split_stages(model, [2])
    freeze_experts(last, [(2, 0), (3, 7)])
    frozen = [n for n, p in last.named_parameters() if is_expert_parameter(n) and not p.requires_grad]
    assert len(frozen) == (2 * 8 - 2) * 3
    opt = torch.optim.AdamW([p for p in last.parameters() if p.requires_grad], lr=1e-3)
    hidden = first(torch.randint(0, 260, (1, 8))).detach()
    last(hidden).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="no such"):
        freeze_experts(last, [(0, 0)])  # layer 0 lives in the first stage


@pytest.mark.parametrize("boundaries", [[3, 1], [0], [4], [2, 2], [-1]])
def test_bad_boundaries(boundaries: list[int]) -> None:
    with pytest.raises(ValueError, match="boundaries"):
        split_stages(build_model(get_preset("nano")), boundaries)


def test_middle_stage_rejects_tokens() -> None:
    _, middle, _ = split_stages(build_model(get_preset("nano")), [1, 2])
    with pytest.raises(ValueError, match="expects hidden"):
        middle(torch.zeros(1, 4, dtype=torch.long))


def test_pipeline_backward_recipe_from_the_docs() -> None:
    """Stages run as separate workers: activations and their gradients cross the cuts detached."""
    cfg = get_preset("moe-nano")
    model, twin = build_model(cfg, seed=0), build_model(cfg, seed=0)
    tokens = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(2))
    model(tokens, tokens).loss.backward()
    stages = split_stages(twin, [1, 3])
    inputs, outputs = [], []
    x = tokens
    for stage in stages:  # forward: each worker receives a detached activation
        x_in = x if stage.is_first else x.detach().requires_grad_()
        inputs.append(x_in)
        x = stage(x_in)
        outputs.append(x)
    lm = torch.nn.functional.cross_entropy(x.flatten(0, 1), tokens.flatten())
    (lm + stages[-1].weighted_aux_loss()).backward()
    for i in range(len(stages) - 2, -1, -1):  # backward: grad of the next stage's input flows back
        grad = inputs[i + 1].grad
        torch.autograd.backward([outputs[i], stages[i].weighted_aux_loss()], [grad, torch.ones(())])
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        twin_grad = twin_params[name].grad
        if param.grad is not None:
            assert twin_grad is not None and torch.allclose(param.grad, twin_grad, atol=1e-6), name


@pytest.mark.parametrize("name, tie", CASES)
def test_a_stage_built_alone_holds_only_its_tensors_and_computes_what_the_full_models_stage_does(name: str, tie: bool) -> None:
    cfg = get_preset(name, tie_embeddings=tie)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    full_stages = split_stages(model, [1, 3])
    x = tokens
    for index, reference in enumerate(full_stages):
        skeleton, stage = build_stage(cfg, [1, 3], index)
        own = {n for n, _ in stage.named_parameters()}
        assert own == {n for n, _ in reference.named_parameters()}
        real = {n for n, p in skeleton.named_parameters() if not p.is_meta}
        assert real == own  # the rest of the model has names and shapes, no storage
        assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in stage.named_parameters():
                p.copy_(dict(model.named_parameters())[n])
        out = stage(x)
        assert torch.equal(out, reference(x))
        x = out
