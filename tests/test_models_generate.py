"""Sampling."""

import pytest
import torch

from models import LanguageModel, build_model, generate, get_preset


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    return build_model(get_preset("nano", max_seq_len=16), seed=0)


def test_shape_and_determinism(model: LanguageModel) -> None:
    prompt = torch.randint(0, 260, (3, 5), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 8, top_k=20, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 8, top_k=20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 13) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < 260


def test_crops_context_and_restores_mode(model: LanguageModel) -> None:
    model.train()
    long_prompt = torch.randint(0, 260, (1, 40))  # longer than max_seq_len=16
    out = generate(model, long_prompt, 4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 44) and model.training
    model.eval()
    generate(model, long_prompt, 1)
    assert not model.training


def test_greedy_equals_top1_and_matches_argmax(model: LanguageModel) -> None:
    prompt = torch.randint(0, 260, (2, 6), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, 5, temperature=0.0)
    top1 = generate(model, prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    assert torch.equal(greedy[:, 6], model(prompt).logits[:, -1].argmax(-1))


def test_rejects_bad_arguments(model: LanguageModel) -> None:
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kwargs in (dict(temperature=-1.0), dict(top_k=0)):
        with pytest.raises(ValueError):
            generate(model, prompt, 1, **kwargs)
