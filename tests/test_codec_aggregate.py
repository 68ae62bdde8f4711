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


def test_trimmed_mean_drops_the_extremes_per_coordinate_and_is_order_independent():
    import pytest

    from swarm.codec import SlotTrimmedMean, slot_aggregator

    shapes = {"w": (2, 3)}
    honest = [torch.full((2, 3), v) for v in (1.0, 2.0, 3.0)]
    attack = torch.tensor([[1e4, -1e4, 1e4], [-1e4, 1e4, 2.0]])
    acc = slot_aggregator(shapes, trim=0.25)
    assert isinstance(acc, SlotTrimmedMean)
    for t in [*honest, attack]:
        acc.add({"w": t})
    out = acc.mean()["w"]
    # per element: 4 values, one dropped at each end, the middle two averaged
    expected = torch.tensor([[2.5, 1.5, 2.5], [1.5, 2.5, 2.0]])
    assert torch.equal(out, expected)
    again = slot_aggregator(shapes, trim=0.25)
    for t in [attack, *reversed(honest)]:
        again.add({"w": t})
    assert torch.equal(again.mean()["w"], out)
    assert type(slot_aggregator(shapes)).__name__ == "SlotMean"
    with pytest.raises(ValueError):
        SlotTrimmedMean(shapes, 0.5)
    from swarm.run import OuterConfig

    with pytest.raises(ValueError, match="dense codec"):
        OuterConfig(trim=0.2)  # sparse contributions would lose their few values
    assert OuterConfig(codec="dense-fp32", trim=0.2).trim == 0.2
