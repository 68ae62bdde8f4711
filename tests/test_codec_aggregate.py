"""The 1/R mean of decoded pseudo-gradients."""

import pytest
import torch

from swarm.codec.aggregate import mean_of_payloads


def test_divides_by_replicas_not_by_selecting_peers():
    one = {"w": torch.tensor([4.0, 0.0, 2.0])}
    two = {"w": torch.tensor([0.0, 0.0, 2.0])}
    three = {"w": torch.tensor([0.0, 3.0, 2.0])}
    mean = mean_of_payloads([one, two, three], ["w"])["w"]
    assert torch.equal(mean, torch.tensor([4.0 / 3, 1.0, 2.0]))  # not [4, 3, 2]


def test_sums_in_list_order_in_fp32():
    generator = torch.Generator().manual_seed(0)
    payloads = [{"w": torch.randn(1000, generator=generator) * 10 ** (i % 3)} for i in range(5)]
    total = payloads[0]["w"].clone()
    for payload in payloads[1:]:
        total = total + payload["w"]
    assert torch.equal(mean_of_payloads(payloads, ["w"])["w"], total / 5)
    assert mean_of_payloads(payloads, ["w"])["w"].dtype == torch.float32


def test_inputs_are_not_modified_and_only_named_tensors_returned():
    first = {"a": torch.ones(2), "b": torch.ones(2)}
    result = mean_of_payloads([first, {"a": torch.ones(2) * 3, "b": torch.ones(2)}], ["a"])
    assert list(result) == ["a"] and torch.equal(result["a"], torch.full((2,), 2.0))
    assert torch.equal(first["a"], torch.ones(2))


def test_rejects_missing_names_shape_mismatch_and_no_payloads():
    with pytest.raises(ValueError, match="missing"):
        mean_of_payloads([{"a": torch.ones(2)}, {}], ["a"])
    with pytest.raises(ValueError, match="shape"):
        mean_of_payloads([{"a": torch.ones(2)}, {"a": torch.ones(3)}], ["a"])
    with pytest.raises(ValueError, match="zero payloads"):
        mean_of_payloads([], ["a"])
