"""The packed-storage codec (registry.weights.packing): byte-exact round trips for every dtype,
with and without a reference; how files are cut into segments; refusal of damaged payloads."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from registry.weights import kernels, packing
from registry.weights.packing import PackError, Segment, decode, decoded_length, encode, needs_reference, segments
from tests.weights import packing_reference

# safetensors dtype -> (element bytes, torch dtype used to make float values or None for ints)
DTYPES: dict[str, tuple[int, torch.dtype | None, np.dtype]] = {
    "BF16": (2, torch.bfloat16, np.dtype(np.uint16)),
    "F16": (2, torch.float16, np.dtype(np.uint16)),
    "F32": (4, torch.float32, np.dtype(np.uint32)),
    "F64": (8, torch.float64, np.dtype(np.uint64)),
    "I8": (1, None, np.dtype(np.int8)),
    "U8": (1, None, np.dtype(np.uint8)),
    "BOOL": (1, None, np.dtype(np.bool_)),
    "I16": (2, None, np.dtype(np.int16)),
    "U16": (2, None, np.dtype(np.uint16)),
    "I32": (4, None, np.dtype(np.int32)),
    "U32": (4, None, np.dtype(np.uint32)),
    "I64": (8, None, np.dtype(np.int64)),
    "U64": (8, None, np.dtype(np.uint64)),
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = (1, torch.float8_e4m3fn, np.dtype(np.uint8))
if hasattr(torch, "float8_e5m2"):
    DTYPES["F8_E5M2"] = (1, torch.float8_e5m2, np.dtype(np.uint8))

# bit patterns worth a round trip: NaNs with payloads and signs, signalling NaNs, ±inf, ±0,
# the smallest subnormals, the largest finite values
SPECIALS: dict[str, list[int]] = {
    "F32": [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFFBFFFFF, 0x7F800000, 0xFF800000,
            0x80000000, 0x00000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF],
    "BF16": [0x7FC0, 0xFFC0, 0x7FC1, 0x7F81, 0xFFFF, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x807F, 0x7F7F],
    "F16": [0x7E00, 0xFE00, 0x7E01, 0x7C01, 0xFFFF, 0x7C00, 0xFC00, 0x8000, 0x0000, 0x0001, 0x83FF, 0x7BFF],
    "F64": [0x7FF8000000000000, 0xFFF8000000000001, 0x7FF0000000000001, 0x7FF0000000000000,
            0xFFF0000000000000, 0x8000000000000000, 0x0000000000000001, 0x7FEFFFFFFFFFFFFF],
    "F8_E4M3": [0x7F, 0xFF, 0x80, 0x00, 0x01, 0x7E],
    "F8_E5M2": [0x7C, 0xFC, 0x7D, 0x7F, 0xFF, 0x80, 0x00, 0x01],
}


def _values(dtype: str, n: int, kind: str, rng: np.random.Generator) -> bytes:
    """``n`` elements of ``dtype`` as raw bytes, drawn as ``kind``."""
    width, tdt, ndt = DTYPES[dtype]
    if kind == "bits" or n == 0:
        return rng.integers(0, 256, n * width, dtype=np.uint8).tobytes()
    if kind == "constant":
        return (rng.integers(0, 256, width, dtype=np.uint8).tobytes()) * n
    if tdt is None:  # integers: small values around a level, like indices or counts
        if ndt == np.bool_:
            return (rng.random(n) < 0.3).astype(np.uint8).tobytes()
        info = np.iinfo(ndt)
        v = rng.integers(max(info.min, -1000), min(info.max, 1000), n, endpoint=True)
        return v.astype(ndt).tobytes()
    scale = {"weights": 0.02, "wide": 30.0}.get(kind, 1.0)
    x = torch.from_numpy(rng.standard_normal(n) * scale)
    if kind == "sparse":
        x = x * torch.from_numpy(rng.random(n) < 0.1)
    out = x.to(tdt).view(torch.uint8).numpy().copy()
    if kind == "specials" and dtype in SPECIALS:
        pats = SPECIALS[dtype]
        v = out.view(np.dtype(f"<u{width}"))
        idx = rng.integers(0, n, max(1, n // 4))
        v[idx] = np.array([pats[i % len(pats)] for i in range(len(idx))], dtype=v.dtype)
    return out.tobytes()


def _derived(dtype: str, base: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """A reference-related version of ``base``: a small update, a few flipped bits, or equal."""
    width, tdt, ndt = DTYPES[dtype]
    if kind == "equal" or not base:
        return base
    if kind == "flips":
        b = bytearray(base)
        for i in rng.integers(0, len(b), max(1, len(b) // 50)):
            b[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if tdt is None or ndt == np.bool_:
        v = np.frombuffer(base, dtype=np.uint8 if ndt == np.bool_ else ndt).copy()
        step = rng.integers(-2, 3, len(v))
        if ndt == np.bool_:
            return bytes(((v + (step == 2)) % 2).astype(np.uint8).tobytes())
        return bytes((v + step.astype(v.dtype)).astype(ndt).tobytes())
    x = torch.frombuffer(bytearray(base), dtype=tdt).to(torch.float64)
    upd = torch.from_numpy(rng.standard_normal(len(x))) * 1e-3
    return (x + upd).to(tdt).view(torch.uint8).numpy().tobytes()


def _roundtrip(data: bytes, dtype: str | None, ref: bytes | None, **kw: int) -> bytes:
    payload = encode(data, dtype, ref, **kw)
    assert decoded_length(payload) == len(data)
    assert decode(payload, ref if needs_reference(payload) else None) == data
    assert decode(payload, ref, expected_length=len(data)) == data
    return payload


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    n=st.one_of(st.integers(0, 40), st.integers(41, 3000)),
    kind=st.sampled_from(["bits", "gaussian", "weights", "wide", "sparse", "specials", "constant"]),
    ref_kind=st.sampled_from([None, "update", "flips", "equal", "unrelated"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_is_byte_exact(dtype: str, n: int, kind: str, ref_kind: str | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = _values(dtype, n, kind, rng)
    if ref_kind is None:
        _roundtrip(base, dtype, None)
        return
    data = _values(dtype, n, "bits", rng) if ref_kind == "unrelated" else _derived(dtype, base, ref_kind, rng)
    payload = _roundtrip(data, dtype, base)
    if ref_kind == "equal" and n >= 64:
        assert len(payload) < 64  # equal bytes cost next to nothing


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64", "F8_E4M3", "I32"]),
       n=st.integers(200, 6000), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_through_reordering_and_sections(dtype: str, n: int, seed: int) -> None:
    """Small thresholds so that small segments take the reordered, sectioned path too."""
    if dtype not in DTYPES:
        pytest.skip("no float8 in this torch")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing, "_SORT_MIN", 16)
        m.setattr(packing, "_SECTION_MIN", 32)
        m.setattr(packing, "_SORT_GAIN_BITS", -1e9)  # always reorder when the dtype has an exponent
        rng = np.random.default_rng(seed)
        base = _values(dtype, n, "specials" if seed % 2 else "weights", rng)
        data = _derived(dtype, base, "update", rng)
        payload = _roundtrip(data, dtype, base)
        if dtype != "I32" and needs_reference(payload):
            assert payload[8] > 0  # key bits: reordered
    # the section size travels in the payload: decoding does not depend on the module's constants
    assert decode(payload, base if needs_reference(payload) else None) == data


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_the_counting_sort_is_the_stable_argsort(width: int) -> None:
    """The compiled passes place the elements in the stable order of the reference's key (what
    ``np.argsort(key, kind="stable")`` gives) and back."""
    rng = np.random.default_rng(width)
    dt = np.dtype(f"<u{width}")
    for n in (0, 1, 5, 63, 64, 65, 1000, 5000):
        for shift, kbits in ((0, 3), (1, 8), (width * 8 - 11 if width > 1 else 2, 11 if width > 1 else 6)):
            r = rng.integers(0, 1 << (8 * width), n, dtype=np.uint64).astype(dt) if width < 8 else \
                rng.integers(0, 2**63, n, dtype=np.uint64)
            key = (r.astype(np.uint64) >> np.uint64(shift)) & np.uint64((1 << kbits) - 1)
            counts = kernels.key_counts(r, shift, kbits)
            assert (counts == np.bincount(key.astype(np.intp), minlength=1 << kbits)).all()
            x = rng.integers(0, 256, n * width, dtype=np.uint8).view(dt)
            grid = np.empty((width, n), dtype=np.uint8)
            kernels.split_planes(x, r, 2, 0, shift, kbits, counts, grid)  # XOR with r, not rotated
            order = np.argsort(key, kind="stable")
            assert (grid == (x ^ r)[order].view(np.uint8).reshape(-1, width).T).all()
            back = np.empty_like(x)
            kernels.join_planes(grid, r, 2, 0, shift, kbits, counts, back)
            assert (back == x).all()


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64", "I32"]), n=st.integers(0, 6000),
       seed=st.integers(0, 2**32 - 1))
def test_a_reference_object_codes_exactly_like_its_bytes(dtype: str, n: int, seed: int) -> None:
    """A :class:`packing.Reference` (which keeps the reference's element order between calls)
    gives the payload the plain bytes give, and decodes it, however often it is reused."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing, "_SORT_MIN", 16)
        m.setattr(packing, "_SECTION_MIN", 32)
        m.setattr(packing, "_SORT_GAIN_BITS", -1e9)  # reorder wherever the dtype has an exponent
        rng = np.random.default_rng(seed)
        base = _values(dtype, n, "weights", rng)
        ref = packing.Reference(base)
        for _ in range(2):
            data = _derived(dtype, base, "update", rng)
            payload = encode(data, dtype, ref)
            assert payload == encode(data, dtype, base)
            assert decode(payload, ref) == data == decode(payload, base)
        ref.forget()
        assert decode(payload, ref) == data


def test_a_reference_may_skip_its_crc_the_payload_coded_against_it_may_not() -> None:
    """Bytes decoded only to serve as a reference may skip their CRC-32 (``check_crc=False``):
    the payload coded against them checks its own result, which a wrong reference makes wrong."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, 20000, dtype=np.uint8)
    data = (base + (rng.random(20000) < 0.01)).astype(np.uint8).tobytes()  # a few bytes moved by one
    ref_payload = bytearray(encode(base.tobytes(), "U8"))  # incompressible: stored raw
    payload = encode(data, "U8", base.tobytes())
    assert needs_reference(payload) and not needs_reference(ref_payload)
    ref_payload[-100] ^= 0x01  # a damaged reference payload that still parses
    with pytest.raises(PackError, match="CRC"):
        decode(bytes(ref_payload))
    wrong = decode(bytes(ref_payload), check_crc=False)
    assert wrong != base.tobytes()
    with pytest.raises(PackError, match="CRC"):  # ... and what is coded against it fails its own check
        decode(payload, wrong)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 63, 64, 65, 1023, 4097])
@pytest.mark.parametrize("dtype", [None, "F32", "BF16", "F64"])
def test_odd_lengths(dtype: str | None, n: int) -> None:
    """Opaque bytes of any length; a float dtype with a length that is not a whole number of
    elements is coded as bytes."""
    rng = np.random.default_rng(n)
    data = bytes(rng.integers(0, 4, n, dtype=np.uint8))
    _roundtrip(data, dtype, None)
    _roundtrip(data, dtype, bytes(reversed(data)))


def test_memoryview_and_bytearray_inputs() -> None:
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    y = x + np.float32(1e-4)
    data, ref = memoryview(y.tobytes()), bytearray(x.tobytes())
    payload = encode(data, "F32", ref)
    assert decode(memoryview(payload), memoryview(ref)) == y.tobytes()
    arr_view = memoryview(y.data)  # a float32 buffer, not bytes
    assert decode(encode(arr_view, "F32"), None) == y.tobytes()


def _bf16(x: torch.Tensor) -> bytes:
    return x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def test_compresses_like_it_should() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g) * 0.02
    base = _bf16(w)
    tuned = _bf16(w + torch.randn(256, 1024, generator=g) * 2e-4)
    assert len(encode(base, "BF16")) / len(base) < 0.70  # exponents in their own plane
    p = encode(tuned, "BF16", base)
    assert needs_reference(p) and len(p) / len(tuned) < 0.25
    assert len(encode(base, "BF16", base)) < 100  # equal to its reference
    assert len(encode(w.numpy().tobytes(), "F32")) / (4 * w.numel()) < 0.85
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    assert len(encode(noise, None)) <= len(noise) + 32  # raw when nothing helps
    assert len(encode(b"\0" * (1 << 20), None)) < 64


def test_unrelated_reference_is_not_used() -> None:
    rng = np.random.default_rng(1)
    data = (rng.standard_normal(20000) * 0.02).astype(np.float32).tobytes()
    unrelated = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    p = encode(data, "F32", unrelated)
    assert not needs_reference(p)
    assert decode(p) == data


def test_encode_is_deterministic_across_threads_and_levels() -> None:
    rng = np.random.default_rng(2)
    base = (rng.standard_normal(70000) * 0.02).astype(np.float32)
    data = (base + rng.standard_normal(70000).astype(np.float32) * 1e-4).tobytes()
    first = [encode(data, "F32", base.tobytes()), encode(data, "F32"), encode(data, None)]
    again: list[list[bytes]] = []
    t = threading.Thread(target=lambda: again.append(
        [encode(data, "F32", base.tobytes()), encode(data, "F32"), encode(data, None)]))
    t.start()
    t.join()
    assert again == [first]
    for level in (1, 3, 9):
        p = encode(data, "F32", base.tobytes(), level=level)
        assert p == encode(data, "F32", base.tobytes(), level=level)
        assert decode(p, base.tobytes()) == data


# --- damaged payloads and references ---------------------------------------------------------------


def _payloads() -> list[tuple[bytes, bytes | None, bytes]]:
    """(payload, reference, data) covering every method and stream mode."""
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal(20000) * 0.02)
    base_bf16, tuned_bf16 = _bf16(w), _bf16(w + torch.from_numpy(rng.standard_normal(20000)) * 3e-5)
    base32 = w.to(torch.float32).numpy().tobytes()
    tuned32 = (w.to(torch.float32) + 1e-4).numpy().tobytes()
    out = []
    for data, dtype, ref in [
        (tuned_bf16, "BF16", base_bf16),
        (tuned32, "F32", base32),
        (base32, "F32", None),
        (b'{"__metadata__": {"format": "pt"}}' * 40, None, None),
        (rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), None, None),  # raw
        (b"\x07" * 5000, "U8", None),  # constant
        (rng.choice(np.arange(3, dtype=np.uint8), 20000, p=[0.8, 0.15, 0.05]).tobytes(), "U8", None),  # 2-bit
    ]:
        out.append((encode(data, dtype, ref), ref, data))
    return out


def test_payloads_cover_every_method_and_stream_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[bytes] = []
    real = packing._packed

    def spy(*a: object, **kw: object) -> bytes:
        out = real(*a, **kw)  # type: ignore[arg-type]
        packed.append(out)
        return out

    monkeypatch.setattr(packing, "_packed", spy)
    payloads = _payloads()
    assert {p[4] for p, _, _ in payloads} == {0, 1, 3}  # raw, planes, difference (XOR: test_xor_method_decodes)
    chosen = {c[0] for c in packed if any(c in p for p, _, _ in payloads)}
    assert chosen == {3, 4}  # 4-bit and 2-bit packed streams were kept somewhere
    assert any(p[4] == 3 and p[8] > 0 for p, _, _ in payloads)  # reordered by the reference's exponent


def test_every_truncation_is_refused() -> None:
    for payload, ref, _ in _payloads():
        for cut in range(len(payload)):
            with pytest.raises(PackError):
                decode(payload[:cut], ref)


def test_corruption_is_refused_or_harmless() -> None:
    """Flip bits all over the payload: decode raises PackError, or (a flip that changes nothing
    that matters) returns exactly the original bytes; never other bytes, never another error."""
    rng = np.random.default_rng(4)
    for payload, ref, data in _payloads():
        positions = range(len(payload)) if len(payload) < 600 else rng.integers(0, len(payload), 600)
        for i in positions:
            for flip in (0x01, 0x80, 0xFF):
                bad = bytearray(payload)
                bad[i] ^= flip
                with contextlib.suppress(PackError):
                    assert decode(bytes(bad), ref) == data


def test_trailing_bytes_and_bad_headers_are_refused() -> None:
    payload, ref, _ = _payloads()[0]
    with pytest.raises(PackError, match="trail"):
        decode(payload + b"\0", ref)
    with pytest.raises(PackError, match="magic"):
        decode(b"XYZ" + payload[3:], ref)
    with pytest.raises(PackError, match="version"):
        decode(payload[:3] + b"\x63" + payload[4:], ref)
    with pytest.raises(PackError, match="method"):
        decode(payload[:4] + b"\x09" + payload[5:], ref)
    with pytest.raises(PackError):
        decode(b"", None)
    with pytest.raises(PackError):
        needs_reference(b"RP")


def test_reference_missing_wrong_length_or_wrong_bytes() -> None:
    payload, ref, data = _payloads()[0]
    assert ref is not None and needs_reference(payload)
    with pytest.raises(PackError, match="reference"):
        decode(payload)
    with pytest.raises(PackError, match="reference"):
        decode(payload, ref[:-2])
    with pytest.raises(PackError, match="reference"):
        decode(payload, ref + b"\0\0")
    other = bytearray(ref)
    other[100] ^= 0x10
    with pytest.raises(PackError, match="CRC"):
        decode(payload, bytes(other))
    with pytest.raises(PackError, match="reference"):
        encode(data, "BF16", ref[:-2])
    with pytest.raises(PackError, match="expected"):
        decode(payload, ref, expected_length=len(data) + 2)
    assert issubclass(PackError, ValueError)


def test_xor_method_decodes() -> None:
    """XOR with the reference stays in the format (the encoder prefers the difference)."""
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(9000) * 0.02).astype(np.float32)
    data = (base * np.float32(1.001)).tobytes()
    raw = np.frombuffer(data, dtype=np.uint8)
    for bits in (0, 8):
        p = packing._encode_as(raw, packing._XOR, (4, 1, 23, bits), packing.Reference(base.tobytes()),
                               zlib.crc32(raw.data), 1)
        assert needs_reference(p) and decode(p, base.tobytes()) == data
        with pytest.raises(PackError):
            decode(p)


# --- segments ----------------------------------------------------------------------------------------------


def _reader(blob: bytes) -> Callable[[int, int], bytes]:
    return lambda off, n: blob[off:off + n]


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _check_cover(segs: list[Segment], size: int) -> None:
    pos = 0
    for s in segs:
        assert s.offset == pos and s.length > 0
        pos += s.length
    assert pos == size
    assert all((s.dtype is None) == (s.key is None) for s in segs)


def _tensors(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16) * scale,
        "model.layers.0.q.weight": torch.randn(16, 16, generator=g) * scale,
        "model.layers.0.q.bias": torch.randn(16, generator=g).to(torch.float16),
        "model.norm.weight": torch.ones(16, dtype=torch.float64),
        "model.ids": torch.arange(7, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.empty": torch.zeros(0, 4),
        "model.scalar": torch.tensor(3.5),
        "weird|name with | bars": torch.arange(5, dtype=torch.int8),
    }


_GOOD_FILE = _safetensors_bytes(
    {"a": torch.arange(20, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16), "c": torch.zeros(0)},
    {"format": "pt"})


def test_segments_of_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x" * 100})
    blob = path.read_bytes()
    segs = segments(_reader(blob), len(blob))
    _check_cover(segs, len(blob))
    (n,) = struct.unpack("<Q", blob[:8])
    assert segs[0] == Segment(0, 8 + n, None, None)
    header = json.loads(blob[8:8 + n])
    by_name = {s.key.rsplit("|", 1)[0].split("|")[0] + "|" + s.key.split("|", 3)[3]: s for s in segs[1:] if s.key}
    assert len(segs) == 1 + sum(1 for k, t in tensors.items() if t.numel())  # the empty tensor: no segment
    for name, t in tensors.items():
        if not t.numel():
            continue
        spec = header[name]
        seg = by_name[f"{spec['dtype']}|{name}"]
        assert seg.dtype == spec["dtype"]
        assert seg.offset == 8 + n + spec["data_offsets"][0] and seg.length == t.numel() * t.element_size()
        shape = "x".join(str(d) for d in t.shape)
        assert seg.key == f"{spec['dtype']}|{shape}|0-{t.numel()}|{name}"


def test_segments_cut_big_tensors_into_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "FRAME_BYTES", 100)
    for seed in (0, 1):
        save_file(_tensors(seed), str(tmp_path / f"{seed}.safetensors"))
    blobs = [(tmp_path / f"{s}.safetensors").read_bytes() for s in (0, 1)]
    cut = [segments(_reader(b), len(b)) for b in blobs]
    for segs, blob in zip(cut, blobs, strict=True):
        _check_cover(segs, len(blob))
        for s in segs[1:]:
            assert s.length <= 100 and s.dtype is not None
            width = {"BF16": 2, "F32": 4, "F16": 2, "F64": 8, "I64": 8, "BOOL": 1, "I8": 1}[s.dtype]
            assert s.length % width == 0
        emb = [s for s in segs if s.key and s.key.endswith("|model.embed.weight")]
        assert len(emb) == 16 and [s.length for s in emb] == [100] * 16  # 1600 bytes of bf16
        assert emb[1].key == "BF16|50x16|50-100|model.embed.weight"
        f32 = [s for s in segs if s.key and s.key.endswith("|model.layers.0.q.weight")]
        assert [s.length for s in f32] == [100] * 10 + [24]  # 25 fp32 per frame
    # the same tensor frames carry the same keys in two files of one architecture
    keys = [[s.key for s in segs if s.key] for segs in cut]
    assert keys[0] == keys[1] and len(set(keys[0])) == len(keys[0])


def test_segments_of_sub_byte_dtypes_end_on_whole_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6-bit dtype packs 4 elements into 3 bytes: frames are whole multiples of 3 bytes."""
    monkeypatch.setattr(packing, "FRAME_BYTES", 10)
    header = json.dumps({"a": {"dtype": "F6_E2M3", "shape": [40], "data_offsets": [0, 30]},
                         "b": {"dtype": "F4", "shape": [6], "data_offsets": [30, 33]}}).encode()
    header += b" " * (-len(header) % 8)
    blob = struct.pack("<Q", len(header)) + header + bytes(range(33))
    segs = segments(_reader(blob), len(blob))
    _check_cover(segs, len(blob))
    a = [s for s in segs if s.dtype == "F6_E2M3"]
    assert [s.length for s in a] == [9, 9, 9, 3]
    assert [s.key.split("|")[2] for s in a if s.key] == ["0-12", "12-24", "24-36", "36-40"]
    b = [s for s in segs if s.dtype == "F4"]
    assert [s.length for s in b] == [3]


@pytest.mark.parametrize("case", ["random", "truncated", "huge-length", "not-json", "trailing", "tiny", "empty"])
def test_segments_of_anything_else_are_opaque_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      case: str) -> None:
    monkeypatch.setattr(packing, "FRAME_BYTES", 1000)
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    good = path.read_bytes()
    blob = {
        "random": np.random.default_rng(0).integers(0, 256, 3501, dtype=np.uint8).tobytes(),
        "truncated": good[:-3],
        "huge-length": struct.pack("<Q", 1 << 60) + good[8:],
        "not-json": good[:8] + b"[" + good[9:],
        "trailing": good + b"\0",
        "tiny": b"\x01\x02\x03",
        "empty": b"",
    }[case]
    segs = segments(_reader(blob), len(blob))
    _check_cover(segs, len(blob))
    assert all(s.dtype is None and s.key is None and s.length <= 1000 for s in segs)
    assert len(segs) == -(-len(blob) // 1000)


@settings(max_examples=150, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 2000)), frame=st.sampled_from([7, 64, 4096]))
def test_segments_of_damaged_files_still_cover_them(flips: list[tuple[int, int]], cut: int | None,
                                                     frame: int) -> None:
    """Bytes flipped in or near the header, or the file cut short: whatever parses is cut by its
    header, the rest is opaque, and the segments always cover the file exactly."""
    blob = bytearray(_GOOD_FILE)
    for pos, x in flips:
        if pos < len(blob):
            blob[pos] ^= x
    data = bytes(blob[:cut] if cut is not None else blob)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packing, "FRAME_BYTES", frame)
        segs = segments(_reader(data), len(data))
    _check_cover(segs, len(data))
    assert all(s.length <= max(frame, 8 + 400) for s in segs[1:])


def test_files_round_trip_segment_by_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pack job does: cut base and fine-tune, code each fine-tune segment against the base
    segment with the same key, decode, concatenate: the same file, byte for byte."""
    monkeypatch.setattr(packing, "FRAME_BYTES", 256)
    base_t = _tensors(0)
    tuned_t = {k: (v + 0.001 * torch.randn_like(v) if v.is_floating_point() else v).to(v.dtype)
               for k, v in base_t.items()}
    tuned_t["extra.head"] = torch.randn(3, 5)
    save_file(base_t, str(tmp_path / "base.safetensors"))
    save_file(tuned_t, str(tmp_path / "tuned.safetensors"), metadata={"format": "pt"})
    base, tuned = (tmp_path / "base.safetensors").read_bytes(), (tmp_path / "tuned.safetensors").read_bytes()
    refs = {s.key: base[s.offset:s.offset + s.length] for s in segments(_reader(base), len(base)) if s.key}
    rebuilt = bytearray()
    used = 0
    for s in segments(_reader(tuned), len(tuned)):
        data = tuned[s.offset:s.offset + s.length]
        ref = refs.get(s.key) if s.key else None
        payload = encode(data, s.dtype, ref)
        used += needs_reference(payload)
        rebuilt += decode(payload, ref if needs_reference(payload) else None, expected_length=s.length)
    assert bytes(rebuilt) == tuned
    assert used > 0


# --- the compiled codec against the pure-numpy one it replaced ---------------------------------------------
#
# tests/weights/packing_reference.py is the codec as main shipped it before the kernels. The payload format is
# fixed: the same input must give the same bytes, and each must decode what the other wrote.


def _same_as_reference(data: bytes, dtype: str | None, ref: bytes | None) -> bytes:
    new = encode(data, dtype, ref)
    old = packing_reference.encode(data, dtype, ref)
    assert new == old
    assert decode(old, ref) == data
    assert packing_reference.decode(new, ref) == data
    return new


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(sorted(DTYPES) + [None]),
    n=st.one_of(st.integers(0, 40), st.integers(41, 3000), st.integers(3001, 40000)),
    kind=st.sampled_from(["bits", "gaussian", "weights", "wide", "sparse", "specials", "constant"]),
    ref_kind=st.sampled_from([None, "update", "flips", "equal", "unrelated"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernels_write_the_reference_codecs_bytes(dtype: str | None, n: int, kind: str, ref_kind: str | None,
                                                  seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = _values(dtype or "U8", n, kind, rng)
    if dtype is None and n % 3 == 1:
        base = base[:-1] if base else base  # opaque bytes of any length
    if ref_kind is None:
        _same_as_reference(base, dtype, None)
        return
    data = _values(dtype or "U8", n, "bits", rng)[:len(base)] if ref_kind == "unrelated" else \
        _derived(dtype or "U8", base, ref_kind, rng)
    _same_as_reference(data, dtype, base)


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I32"]),
       n=st.integers(200, 6000), seed=st.integers(0, 2**32 - 1))
def test_kernels_write_the_reference_codecs_bytes_reordered(dtype: str, n: int, seed: int) -> None:
    """Small thresholds in both codecs, so that small segments take the reordered, sectioned path
    and the sampled decision whether reordering pays."""
    if dtype not in DTYPES:
        pytest.skip("no float8 in this torch")
    with pytest.MonkeyPatch.context() as m:
        for mod in (packing, packing_reference):
            m.setattr(mod, "_SORT_MIN", 16)
            m.setattr(mod, "_SECTION_MIN", 32)
            m.setattr(mod, "_SORT_SAMPLE", 256)
            m.setattr(mod, "_SORT_GAIN_BITS", (-1e9, 0.0, 0.125)[seed % 3])
        m.setattr(packing_reference, "_SORT_CHUNK", 64 << (seed % 4))  # its sort runs in several chunks
        rng = np.random.default_rng(seed)
        base = _values(dtype, n, "specials" if seed % 2 else "weights", rng)
        _same_as_reference(_derived(dtype, base, "update", rng), dtype, base)
        _same_as_reference(_derived(dtype, base, "flips", rng), dtype, base)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "I16"])
def test_kernels_write_the_reference_codecs_bytes_on_frames(dtype: str) -> None:
    """Frame-sized segments (the default thresholds: the sampled decision, sections of 8192, every
    stream mode): a fine-tune against its base, the base alone, against an unrelated reference."""
    rng = np.random.default_rng(11)
    n = (1 << 20) // DTYPES[dtype][0] + 7
    base = _values(dtype, n, "weights", rng)
    tuned = _derived(dtype, base, "update", rng)
    for data, ref in ((tuned, base), (base, None), (tuned, _values(dtype, n, "weights", rng))):
        _same_as_reference(data, dtype, ref)


@pytest.mark.parametrize("bits", [2, 4])
def test_symbol_packing_matches_the_reference(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (1, 2, 3, 4, 5, 7, 8, 1001):
        for table in (bytes([7, 3, 200]), bytes(range(40, 55)), bytes([1, 9, 30, 31, 200]), bytes(range(241, 256))):
            if bits == 2:
                table = table[:3]
            pool = np.frombuffer(table + bytes([0, 100, 255]), dtype=np.uint8)
            s = rng.choice(pool, n)
            payload = packing._packed(s, table, bits, 1)
            assert payload == packing_reference._packed(s, table, bits, 1)
            reader = packing._Reader(memoryview(payload), 0)
            assert (reader.stream(n) == s).all() and reader.pos == len(payload)
            strided = np.full((n, 3), 99, dtype=np.uint8)
            packing._Reader(memoryview(payload), 0).stream_into(strided[:, 1])
            assert (strided[:, 1] == s).all() and (strided[:, [0, 2]] == 99).all()
