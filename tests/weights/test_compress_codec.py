"""The compiled rANS coder of registry.weights.codec against its pure-Python reference (the same bytes,
the same codes, the same refusals), and plans saved before the coder was compiled: they load and
reconstruct to the same bytes, and planning writes the same files with either coder.

``data/plan-*.safetensors`` were written by ``compress.save_plan`` at commit 1a90f20 (pure-Python coder)
from the adapters :func:`golden_inputs` builds; ``data/plans-from-main.json`` holds the sha256 of each
file and of each member's ``adapter_model.safetensors`` as ``save_peft_adapter`` wrote its
reconstruction then."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from registry.weights import codec, compress
from registry.weights.adapters import WEIGHTS_NAME, save_peft_adapter
from tests.weights.test_compress import make_lora_adapters

DATA = Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def laplace_codes(gen: np.random.Generator, count: int, q: int, K: int, outliers: float = 0.0) -> np.ndarray:
    """Codes of a row quantized with option q (rms ≈ 1 / t), a fraction ``outliers`` of them beyond ±K
    (the coder clamps those)."""
    c = np.rint(gen.laplace(0.0, 1.0 / (codec.ratio(q) * 2**0.5), count)).astype(np.int64)
    if outliers:
        hit = gen.random(count) < outliers
        c[hit] = gen.choice([-1, 1], int(hit.sum())) * gen.integers(K, 4 * K + 2, int(hit.sum()))
    return c


def both(rows: list[tuple[np.ndarray, int, int]]) -> tuple[bytes, bytes]:
    """(compiled stream, reference stream) of the same rows."""
    streams = []
    for reference in (False, True):
        enc = codec.RansEncoder(reference=reference)
        for c, q, K in rows:
            enc.push(c, q, K)
        streams.append(enc.finish())
    return streams[0], streams[1]


def check_decoders(stream: bytes, rows: list[tuple[np.ndarray, int, int]]) -> None:
    want = np.concatenate([np.clip(c, -K, K) for c, _, K in rows]) if rows else np.zeros(0, np.int64)
    spec = [(len(c), q, K) for c, q, K in rows]
    for reference in (False, True):
        dec = codec.RansDecoder(stream, reference=reference)
        got = dec.read_rows(spec)
        assert got.dtype == np.int64 and np.array_equal(got, want)
        assert dec.done()
    dec = codec.RansDecoder(stream)  # row by row, as before
    assert [x for n, q, K in spec for x in dec.read(n, q, K)] == want.tolist() and dec.done()


@pytest.mark.parametrize("seed", range(6))
def test_compiled_coder_matches_the_reference_on_random_streams(seed):
    gen = np.random.default_rng(seed)
    rows = []
    for _ in range(int(gen.integers(1, 40))):
        q = int(gen.integers(-40, 25))
        length = int(gen.choice([1, 2, 3, 17, 130, 2048, 3000]))
        K = codec.alphabet(length, q)
        rows.append((laplace_codes(gen, length, q, K, outliers=float(gen.choice([0.0, 0.01, 0.3]))), q, K))
    compiled, reference = both(rows)
    assert compiled == reference
    check_decoders(compiled, rows)


def test_edge_cases():
    assert both([]) == (b"", b"")
    assert both([(np.zeros(0, np.int64), 0, 3)]) == (b"", b"")
    check_decoders(b"", [])
    for q in (-64, -32, 0, 6, 24, 32):
        for length in (1, 2048):
            K = codec.alphabet(length, q)
            for sym in (0, 1, -1, K, -K, K + 5, -10 * K):  # a single symbol, incl. the rarest and clamped ones
                rows = [(np.array([sym]), q, K)]
                compiled, reference = both(rows)
                assert compiled == reference and len(compiled) >= 5
                check_decoders(compiled, rows)


@pytest.mark.parametrize("q", [-64, -48, 24, 32])
def test_extreme_spreads(q):
    """Huge alphabets (millions of symbols of frequency ~1) and near-certain zeros; every code at the
    alphabet's edges is the longest symbol there is (the output bound of 4 bytes per code)."""
    gen = np.random.default_rng(q + 100)
    K = codec.alphabet(2048, q)
    edges = gen.choice([-K, K, -K + 1, K - 1], 5000)
    spread = gen.integers(-K, K + 1, 5000)
    rows = [(edges, q, K), (spread, q, K), (laplace_codes(gen, 3000, q, K), q, K)]
    compiled, reference = both(rows)
    assert compiled == reference
    check_decoders(compiled, rows)


def test_long_stream():
    gen = np.random.default_rng(7)
    rows = [(laplace_codes(gen, 2048, q, codec.alphabet(2048, q), 0.001), q, codec.alphabet(2048, q))
            for q in (-20, -12, -8, -4, 0, 4) for _ in range(25)]  # 307 200 codes
    compiled, reference = both(rows)
    assert compiled == reference
    check_decoders(compiled, rows)


def test_both_decoders_refuse_the_same_streams():
    gen = np.random.default_rng(3)
    q, K = -12, codec.alphabet(500, -12)
    rows = [(laplace_codes(gen, 500, q, K), q, K)]
    stream, _ = both(rows)
    for reference in (False, True):
        with pytest.raises(ValueError, match="too short"):
            codec.RansDecoder(stream[:4], reference=reference)
        with pytest.raises(ValueError, match="ended early"):  # truncated
            codec.RansDecoder(stream[: len(stream) // 2], reference=reference).read_rows([(500, q, K)])
        with pytest.raises(ValueError, match="ended early"):  # an empty stream holds no codes
            codec.RansDecoder(b"", reference=reference).read_rows([(1, q, K)])
        dec = codec.RansDecoder(stream + b"\x00", reference=reference)  # trailing byte: read, but not done
        dec.read_rows([(500, q, K)])
        assert not dec.done()
        dec = codec.RansDecoder(stream, reference=reference)  # fewer codes than pushed: not done
        dec.read_rows([(499, q, K)])
        assert not dec.done()
        with pytest.raises(ValueError, match="too large"):
            codec.RansDecoder(stream, reference=reference).read_rows([(1, -64, codec.alphabet(4096, -64))])
    with pytest.raises(ValueError, match="too large"):
        codec.RansEncoder().push([0], -64, codec.alphabet(4096, -64))


def test_tensors_lists_and_python_integers_push_alike():
    q, K = -8, codec.alphabet(64, -8)
    codes = [0, 3, -2, K, -K - 1, 2**70, -(2**70)]  # beyond int64 too: clamped like the rest
    streams = set()
    for form in (codes, np.array(codes[:5]), torch.tensor(codes[:5])):
        enc = codec.RansEncoder()
        enc.push(form, q, K)
        if len(form) == 5:
            enc.push([2**70, -(2**70)], q, K)
        streams.add(enc.finish())
    assert len(streams) == 1 and streams == {both([(np.array([0, 3, -2, K, -K, K, -K]), q, K)])[1]}


# ---------------------------------------------------------------------------------------------
# plans written before the coder was compiled


def golden_inputs() -> dict[str, tuple[list, float, tuple[str, ...]]]:
    return {
        "own": (make_lora_adapters(4, 4, shared_init=False, seed=3), 0.1, compress.METHODS),
        "rmm": (make_lora_adapters(5, 4, drift=0.02, seed=4), 0.1, compress.METHODS),
        "mixed": (make_lora_adapters(3, 4, shared_init=False, seed=3, dtype=torch.float16), 0.005,
                  ("quantize", "truncate")),  # entropy-coded and int8 rows in one module
        "truncated": (make_lora_adapters(3, 4, shared_init=False, seed=6, dtype=torch.bfloat16), 0.6,
                      ("quantize", "truncate")),
    }


EXPECTED = json.loads((DATA / "plans-from-main.json").read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reconstructions(p: compress.CompressionPlan, folder: Path) -> list[str]:
    out = []
    for i in range(len(p.members)):
        save_peft_adapter(p.reconstruct(i), folder / str(i))
        out.append(sha(folder / str(i) / WEIGHTS_NAME))
    return out


@pytest.fixture(params=[False, True], ids=["compiled", "reference"])
def coder(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(codec, "RansEncoder", functools.partial(codec.RansEncoder, reference=True))
        monkeypatch.setattr(codec, "RansDecoder", functools.partial(codec.RansDecoder, reference=True))
    return request.param


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plans_saved_before_load_and_reconstruct_to_the_same_bytes(name, coder, tmp_path):
    exp = EXPECTED[name]
    path = DATA / f"plan-{name}.safetensors"
    assert sha(path) == exp["plan_sha256"]
    p = compress.load_plan(path)
    assert [m.method for m in p.members] == exp["methods"]
    assert reconstructions(p, tmp_path) == exp["members_sha256"]


@pytest.mark.parametrize("name", ["own", "rmm", "mixed"])
def test_planning_writes_the_same_file_with_either_coder(name, tmp_path, monkeypatch):
    ads, eps, methods = golden_inputs()[name]
    files = []
    for reference in (False, True):
        with monkeypatch.context() as m:
            if reference:
                m.setattr(codec, "RansEncoder", functools.partial(codec.RansEncoder, reference=True))
                m.setattr(codec, "RansDecoder", functools.partial(codec.RansDecoder, reference=True))
            compress.save_plan(compress.plan(ads, eps, methods=methods), tmp_path / f"{reference}.safetensors")
        files.append((tmp_path / f"{reference}.safetensors").read_bytes())
    assert files[0] == files[1]
