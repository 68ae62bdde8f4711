"""The codec benchmark runs and reports sane figures on a small parameter set."""

import torch

from swarm.codec.bench import codec_throughput, synthetic_shapes


def test_synthetic_shapes_reach_the_requested_size():
    shapes = synthetic_shapes(3_000_000)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert 3_000_000 <= total < 7_000_000
    assert shapes["embed.weight"][0] % 64 != 0  # edge chunks are exercised


def test_codec_throughput_reports_size_and_speed():
    threads = torch.get_num_threads()
    result = codec_throughput(num_params=300_000, repeats=1, num_threads=1)
    assert torch.get_num_threads() == threads
    keys = {"num_params", "payload_bytes", "encode_mb_s", "decode_mb_s", "bits_per_param", "ratio_vs_fp32"}
    assert set(result) == keys
    assert 0.15 < result["bits_per_param"] < 0.17
    assert result["ratio_vs_fp32"] > 190
    assert result["encode_mb_s"] > 0 and result["decode_mb_s"] > 0
