"""The payload wire format: round trips, exact sizes, and rejection of every malformed case."""

import random
import struct
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch

from swarm.codec import (
    DENSE_FP16,
    DENSE_FP32,
    EncodedTensor,
    PayloadError,
    PayloadMeta,
    SparseLoCoCompressor,
    SparseLoCoConfig,
    decode_part,
    decode_payload,
    decode_tensor,
    encode_dense,
    encode_payload,
    matches_digest,
    part_digest,
    payload_digest,
    payload_part,
    payload_size,
)
from swarm.codec.header import FORMAT_VERSION
from swarm.codec.indexcode import encode_indices
from swarm.codec.quant import pack_codes, table_to_bytes

SHAPES = {"blocks.0.w": (130, 200), "blocks.0.norm": (100,), "embed": (64, 64), "scalar": ()}


def _deltas(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 1e-2 for name, shape in shapes.items()}


def _sparse(config=None, shapes=SHAPES):
    config = config or SparseLoCoConfig()
    encoded = SparseLoCoCompressor(config).compress_all(_deltas(shapes))
    meta = PayloadMeta.for_sparseloco(config, run_id="run-1", round=7, sender="12D3KooWpeer")
    return meta, encoded, encode_payload(meta, encoded)


def _dense(kind, shapes=SHAPES):
    encoded = {name: encode_dense(delta, kind) for name, delta in _deltas(shapes).items()}
    meta = PayloadMeta.for_dense(kind, run_id="run-1", round=7, sender="peer-b")
    return meta, encoded, encode_payload(meta, encoded)


def _split(data: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack_from("<I", data, 4)
    return msgpack.unpackb(data[8 : 8 + header_len], raw=False), data[8 + header_len :]


def _build(header: object, body: bytes, magic: bytes = b"SWP", version: int = FORMAT_VERSION) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return magic + bytes([version]) + struct.pack("<I", len(raw)) + raw + body


# ---------------------------------------------------------------- round trips and sizes


@pytest.mark.parametrize("config", [SparseLoCoConfig(), SparseLoCoConfig(index_coding="fixed", value_bits=4)])
def test_sparse_round_trip(config):
    meta, encoded, data = _sparse(config)
    decoded_meta, tensors = decode_payload(data, expected=SHAPES, expected_codec=("sparseloco", config.wire_params()))
    assert decoded_meta == meta
    assert list(tensors) == sorted(SHAPES)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == SHAPES[name]
        assert torch.equal(tensor, decode_tensor(encoded[name]))


@pytest.mark.parametrize("kind", [DENSE_FP32, DENSE_FP16])
def test_dense_round_trip(kind):
    meta, _encoded, data = _dense(kind)
    decoded_meta, tensors = decode_payload(data, expected=SHAPES)
    assert decoded_meta == meta
    deltas = _deltas()
    for name, tensor in tensors.items():
        if kind == DENSE_FP32:
            assert torch.equal(tensor, deltas[name])
        else:
            assert torch.allclose(tensor, deltas[name], rtol=2**-10, atol=2**-24)


def test_subset_of_expected_names_is_accepted():
    shapes = {"experts.3.w": (64, 128)}
    _, _, data = _sparse(shapes=shapes)
    _, tensors = decode_payload(data, expected={**shapes, "experts.4.w": (64, 128)})
    assert list(tensors) == ["experts.3.w"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: _sparse(),
        lambda: _sparse(SparseLoCoConfig(index_coding="fixed")),
        lambda: _sparse(SparseLoCoConfig(topk_per_chunk=16, value_bits=1)),
        lambda: _dense(DENSE_FP32),
        lambda: _dense(DENSE_FP16),
        lambda: _sparse(shapes={}),
    ],
)
def test_payload_size_formula_is_exact(make):
    meta, encoded, data = make()
    shapes = {name: enc.shape for name, enc in encoded.items()}
    assert payload_size(meta, shapes) == len(data)
    config = SparseLoCoConfig.from_wire_params(meta.params) if meta.params else meta.codec
    assert payload_size(config, shapes) == sum(enc.nbytes for enc in encoded.values())


def test_size_of_one_full_chunk_matches_the_documented_example():
    config = SparseLoCoConfig()
    body = payload_size(config, {"w": (64, 64)})
    assert body == 16 + 16 + 48 + 16  # table, 2-bit codes, EF low (6 bit), EF high (128 bit)
    assert (body - 16) * 8 / 4096 == 0.15625  # bits/param without the per-tensor table
    assert payload_size(SparseLoCoConfig(index_coding="fixed"), {"w": (64, 64)}) - 16 == 16 + 96
    assert payload_size(DENSE_FP32, {"w": (64, 64)}) == 4 * 4096


def test_encoding_is_canonical_and_digest_is_content_address():
    meta, encoded, data = _sparse()
    reordered = dict(reversed(list(encoded.items())))
    assert encode_payload(meta, reordered) == data
    assert payload_digest(data) == payload_digest(bytes(data))
    assert len(payload_digest(data)) == 64
    assert payload_digest(data) != payload_digest(_sparse(SparseLoCoConfig(index_coding="fixed"))[2])


@pytest.mark.parametrize("names", [["blocks.0.w"], ["embed", "scalar"], [], sorted(SHAPES), ["blocks.0.w", "not there"]])
def test_a_part_carries_the_named_tensors_and_checks_against_the_whole_payloads_digest(names):
    meta, _, data = _sparse()
    digest = payload_digest(data)
    part = payload_part(data, names)
    assert part_digest(part) == digest and matches_digest(part, digest, names) and matches_digest(data, digest)
    got_meta, tensors = decode_part(part, digest, expected=SHAPES)
    _, whole = decode_payload(data)
    assert got_meta == meta and set(tensors) == set(names) & set(SHAPES)
    assert all(torch.equal(t, whole[n]) for n, t in tensors.items())
    if names == ["blocks.0.w"]:
        assert len(part) < len(data)  # the other tensors travel as 32-byte hashes


def test_a_tampered_part_is_refused():
    _, _, data = _sparse()
    digest = payload_digest(data)
    part = bytearray(payload_part(data, ["blocks.0.w"]))
    for where in (-1, len(part) // 2, 20):  # a tensor's bytes, a hash of another, the header
        bad = bytearray(part)
        bad[where] ^= 1
        assert not matches_digest(bytes(bad), digest)
        with pytest.raises(PayloadError):
            decode_part(bytes(bad), digest)
    with pytest.raises(PayloadError, match="garbage|truncated"):
        decode_part(bytes(part) + b"\x00", digest)
    with pytest.raises(PayloadError, match="not a part"):
        decode_part(data, digest)
    other = payload_digest(_sparse(SparseLoCoConfig(index_coding="fixed"))[2])
    with pytest.raises(PayloadError, match="does not hash"):
        decode_part(bytes(part), other)
    # a part is never what a whole-payload fetch asked for, and must carry every tensor asked for
    assert not matches_digest(bytes(part), digest)
    assert matches_digest(bytes(part), digest, ["blocks.0.w", "not there"])
    assert not matches_digest(bytes(part), digest, ["blocks.0.w", "embed"])  # "embed" left out
    assert matches_digest(data, digest, ["embed"])  # the whole payload serves any names
    # bytes that are no payload at all match the sha256 they were announced under (refused later as malformed)
    assert matches_digest(b"junk", __import__("hashlib").sha256(b"junk").hexdigest())


def test_encode_rejects_tensors_that_do_not_match_the_meta():
    meta, encoded, _ = _sparse()
    with pytest.raises(ValueError, match="encoded as"):
        encode_payload(meta, {"x": encode_dense(torch.ones(3), DENSE_FP32)})
    short = EncodedTensor("sparseloco", (64, 64), encoded["embed"].sections[:-1], meta.params)
    with pytest.raises(ValueError, match="size formula"):
        encode_payload(meta, {"embed": short})
    with pytest.raises(ValueError):
        PayloadMeta("run", -1, "peer", "sparseloco", SparseLoCoConfig().wire_params())


# ---------------------------------------------------------------- malformed payloads


def _header_case(mutate):
    _, _, data = _sparse()
    header, body = _split(data)
    mutate(header)
    return _build(header, body)


def _set(path, value):
    def mutate(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(key):
    return lambda header: header.pop(key)


def _valid():
    return _sparse()[2]


HEADER_CASES = {
    "header not a map": ([1, 2, 3], "not a map"),
    "missing key": (_delete("round"), "missing \\['round'\\]"),
    "extra key": (_set(("extra",), 1), "unexpected \\['extra'\\]"),
    "round as str": (_set(("round",), "7"), "round"),
    "round as bool": (_set(("round",), True), "round"),
    "negative round": (_set(("round",), -1), "round"),
    "run id not str": (_set(("run_id",), 5), "run_id"),
    "sender bytes": (_set(("sender",), b"peer"), "sender"),
    "version in header": (_set(("version",), FORMAT_VERSION + 1), "version"),
    "unknown codec": (_set(("codec",), "topk-8bit"), "unknown codec"),
    "codec not str": (_set(("codec",), 3), "unknown codec"),
    "params not map": (_set(("params",), [1]), "params"),
    "bad value bits": (_set(("params", "value_bits"), 3), "value_bits"),
    "missing param": (lambda h: h["params"].pop("index_coding"), "params must have exactly"),
    "tensors not list": (_set(("tensors",), {}), "tensors"),
    "entry not map": (_set(("tensors", 0), 5), "not a map"),
    "entry missing lens": (lambda h: h["tensors"][0].pop("lens"), "missing \\['lens'\\]"),
    "name not str": (_set(("tensors", 0, "name"), 5), "name"),
    "shape not list": (_set(("tensors", 0, "shape"), "64x64"), "shape"),
    "float dim": (_set(("tensors", 0, "shape"), [1.5, 2]), "dim"),
    "negative dim": (_set(("tensors", 0, "shape"), [-4096, -1]), "dim"),
    "negative length": (_set(("tensors", 0, "lens"), [-1, 0, 0, 0]), "section length"),
    "lens not formula": (_set(("tensors", 0, "lens"), [16, 17, 48, 16]), "formula"),
    "wrong shape for lens": (_set(("tensors", 0, "shape"), [128, 64]), "formula"),
    "names unsorted": (lambda h: h["tensors"].reverse(), "ascending"),
    "duplicate names": (lambda h: h["tensors"].__setitem__(1, dict(h["tensors"][0])), "unique"),
    "huge dims": (_set(("tensors", 0, "shape"), [2**40, 2**40]), "elements"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_is_rejected(case):
    mutate, reason = HEADER_CASES[case]
    if isinstance(mutate, list):
        data = _build(mutate, _split(_valid())[1])
    else:
        data = _header_case(mutate)
    with pytest.raises(PayloadError, match=reason) as info:
        decode_payload(data)
    assert isinstance(info.value, ValueError) and info.value.reason


def test_framing_errors():
    data = _valid()
    header_len = struct.unpack_from("<I", data, 4)[0]
    for cut in (0, 3, 7, 8, 8 + header_len - 1, 8 + header_len, len(data) - 1):
        with pytest.raises(PayloadError, match="truncated|msgpack"):
            decode_payload(data[:cut])
    with pytest.raises(PayloadError, match="bad magic"):
        decode_payload(b"XYZ" + data[3:])
    with pytest.raises(PayloadError, match=f"unknown format version {FORMAT_VERSION + 1}"):
        decode_payload(data[:3] + bytes([FORMAT_VERSION + 1]) + data[4:])
    with pytest.raises(PayloadError, match="trailing garbage"):
        decode_payload(data + b"\x00")
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode_payload(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadError, match="header length"):
        decode_payload(data[:4] + struct.pack("<I", 2**32 - 1) + data[8:])
    with pytest.raises(PayloadError, match="must be bytes"):
        decode_payload("not bytes")  # type: ignore[arg-type]
    assert decode_payload(bytearray(data))[0].round == 7
    assert decode_payload(memoryview(data))[0].round == 7


def test_header_that_is_not_msgpack():
    body = _split(_valid())[1]
    for raw in (b"\xc1", b"\x81\xa1", msgpack.packb({}) + b"\x00", b"\xa2\xff\xfe"):
        data = b"SWP" + bytes([FORMAT_VERSION]) + struct.pack("<I", len(raw)) + raw + body
        with pytest.raises(PayloadError, match="msgpack"):
            decode_payload(data)


def test_expected_names_shapes_codec_and_budget():
    _meta, _, data = _sparse()
    with pytest.raises(PayloadError, match="unexpected tensor 'scalar'"):
        decode_payload(data, expected={k: v for k, v in SHAPES.items() if k != "scalar"})
    with pytest.raises(PayloadError, match="has shape"):
        decode_payload(data, expected={**SHAPES, "embed": (64, 65)})
    with pytest.raises(PayloadError, match="not the run's"):
        decode_payload(data, expected_codec=("sparseloco", SparseLoCoConfig(topk_per_chunk=32).wire_params()))
    with pytest.raises(PayloadError, match="elements"):
        decode_payload(data, max_numel=1000)


def _with_sections(name, sections):
    """A valid sparse payload whose tensor `name` carries hand-made sections."""
    meta, encoded, _ = _sparse()
    encoded = dict(encoded)
    encoded[name] = EncodedTensor("sparseloco", encoded[name].shape, tuple(sections), meta.params)
    return encode_payload(meta, encoded)


def test_bad_indices_in_a_payload():
    # "blocks.0.norm" is 100 values: one chunk, k = 2
    table = table_to_bytes(np.array([-1.0, -0.5, 0.5, 1.0]) * 1e-2)
    codes = pack_codes(np.array([0, 3]), 2)
    sizes, ks = np.array([100]), np.array([2])
    for idx, reason in (([5, 127], "out of range"), ([9, 9], "duplicate"), ([9, 3], "unsorted")):
        data = _with_sections("blocks.0.norm", (table, codes, *encode_indices(np.array(idx), sizes, ks, "elias-fano")))
        with pytest.raises(PayloadError, match=reason):
            decode_payload(data)
    good = _with_sections("blocks.0.norm", (table, codes, *encode_indices(np.array([3, 99]), sizes, ks, "elias-fano")))
    assert decode_payload(good)[1]["blocks.0.norm"][99] == 1e-2 * np.float32(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e5, -2e4])
def test_bad_quantisation_tables(bad):
    _meta, encoded, _ = _sparse()
    sections = list(encoded["embed"].sections)
    sections[0] = table_to_bytes(np.array([0.0, 0.0, 0.0, bad]))
    with pytest.raises(PayloadError, match="quantisation table"):
        decode_payload(_with_sections("embed", sections))


def test_dense_non_finite_values():
    _, _, data = _dense(DENSE_FP16)
    header, body = _split(data)
    offset = 0  # first tensor in name order is "blocks.0.norm"
    patched = body[:offset] + np.array([np.inf], dtype="<f2").tobytes() + body[offset + 2 :]
    with pytest.raises(PayloadError, match="NaN or inf"):
        decode_payload(_build(header, patched))


# ---------------------------------------------------------------- fuzzing


def _mutate(rng: random.Random, data: bytes, header_end: int) -> bytes:
    buf = bytearray(data)
    op = rng.randrange(6)
    if op == 0:  # flip a few bits anywhere
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif op == 1:  # random bytes inside the header
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(8, header_end)] = rng.randrange(256)
    elif op == 2:
        buf = buf[: rng.randrange(len(buf))]
    elif op == 3:
        pos = rng.randrange(len(buf))
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 4:
        pos = rng.randrange(len(buf))
        del buf[pos : pos + rng.randint(1, 8)]
    else:  # random bytes in the sections
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(header_end, len(buf))] = rng.randrange(256)
    return bytes(buf)


def test_fuzzed_payloads_only_raise_payload_error():
    rng = random.Random(20240611)
    valid = [_sparse()[2], _sparse(SparseLoCoConfig(index_coding="fixed"))[2], _dense(DENSE_FP16)[2]]
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(2500):
        data = rng.choice(valid)
        header_end = 8 + struct.unpack_from("<I", data, 4)[0]
        try:
            decode_payload(_mutate(rng, data, header_end), expected=SHAPES)
            outcomes["ok"] += 1
        except PayloadError as exc:
            assert exc.reason
            outcomes["rejected"] += 1
    assert outcomes["ok"] > 50 and outcomes["rejected"] > 1000


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 4096, 2**40])
    if kind == 1:
        return rng.choice(["", "sparseloco", "dense-fp32", "elias-fano", "a" * 600])
    if kind == 2:
        return rng.choice([True, False, None, 1.5, b"\x00\xff"])
    if kind == 3 and depth < 2:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 4 and depth < 2:
        keys = ["name", "shape", "lens", "chunk_rows", "x"]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.randrange(-5, 70000)


def _paths(node: object, path: tuple = ()) -> Iterator[tuple]:
    yield path
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*path, key))


def test_fuzzed_header_values_only_raise_payload_error():
    rng = random.Random(7)
    valid = [_sparse()[2], _sparse(SparseLoCoConfig(index_coding="fixed"))[2], _dense(DENSE_FP32)[2]]
    for _ in range(1500):
        header, body = _split(rng.choice(valid))
        path = rng.choice(list(_paths(header))[1:])
        _set(path, _random_value(rng))(header)
        try:
            decode_payload(_build(header, body))
        except PayloadError as exc:
            assert exc.reason
