"""Unit tests of the header-level format checks (no server)."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from registry.errors import InvalidInput
from registry.formats import peft
from registry.formats.inspect import content_hash, fingerprint
from registry.formats.paths import clean_path
from registry.formats.safetensors import StreamCheck, check_stream, parse_header, read_header_from_file


def _parse(data: bytes, limit: int = 1 << 20):  # type: ignore[no-untyped-def]
    return parse_header(lambda o, n: data[o:o + n], len(data), file="f.safetensors", max_header_bytes=limit)


def test_header_matches_safetensors_own_reader(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.ones(2, 2, 2,
               dtype=torch.int64), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    h = read_header_from_file(tmp_path / "m.safetensors", file="m", max_header_bytes=1 << 20)
    assert h.metadata == {"format": "pt"}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert set(f.keys()) == set(h.tensors)
        for k in list(f.keys()):
            assert list(f.get_slice(k).get_shape()) == list(h.tensors[k].shape)
    assert h.tensors["b"].dtype == "BF16" and h.tensors["c"].dtype == "I64"


@pytest.mark.parametrize("header,data,reason", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": 1}, 8, "entry must have"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "end 0 < begin 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "hole"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, 8, "entry must have"),
    ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "shape"),
])
def test_bad_headers(header: dict[str, object], data: int, reason: str) -> None:
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidInput) as e:
        _parse(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    assert reason in e.value.message
    assert e.value.code == "invalid_safetensors"


def test_duplicate_json_keys_refused() -> None:
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
          b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    with pytest.raises(InvalidInput, match="duplicate key"):
        _parse(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInput):
        _parse(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_mutated_valid_file_never_crashes(noise: bytes) -> None:
    raw = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = bytearray(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    pos = noise[0] % len(data)
    data[pos:pos + len(noise) - 1] = noise[1:]
    with contextlib.suppress(InvalidInput):
        _parse(bytes(data))


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096, 1 << 20])
def test_stream_check_finds_non_finite_across_chunk_boundaries(tmp_path: Path, chunk: int) -> None:
    good, bad = torch.randn(100, 10), torch.randn(100, 10)
    bad[99, 9] = float("inf")
    half = torch.randn(5, dtype=torch.float16)
    half[0] = float("nan")
    bf = torch.randn(33, dtype=torch.bfloat16)
    bf[32] = float("-inf")
    f64 = torch.randn(3, dtype=torch.float64)
    f64[1] = float("nan")
    save_file({"good": good, "bad": bad, "half": half, "bf": bf, "f64": f64, "ints": torch.arange(5),
               "fine16": torch.randn(9, dtype=torch.float16), "neg": -torch.ones(4)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    header, bad_names = check_stream((data[i:i + chunk] for i in range(0, len(data), chunk)), file="m",
                                     max_header_bytes=1 << 20)
    assert sorted(bad_names) == ["bad", "bf", "f64", "half"]
    assert header == read_header_from_file(tmp_path / "m.safetensors", file="m", max_header_bytes=1 << 20)


def test_stream_check_rejects_bad_header_early() -> None:
    sc = StreamCheck(file="x", max_header_bytes=100)
    with pytest.raises(InvalidInput) as e:
        sc.feed(struct.pack("<Q", 1 << 30))
    assert e.value.code == "header_too_large"
    sc = StreamCheck(file="x", max_header_bytes=100)
    sc.feed(struct.pack("<Q", 10) + b"{")
    with pytest.raises(InvalidInput, match="truncated"):
        sc.finish()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_stream_check_agrees_with_random_access_parser(data: bytes, chunk: int) -> None:
    def run_stream() -> object:
        return check_stream((data[i:i + chunk] for i in range(0, len(data), chunk)), file="f",
                            max_header_bytes=1 << 20)[0]

    try:
        expected: object = _parse(data)
    except InvalidInput as e:
        expected = e.code
    try:
        got: object = run_stream()
    except InvalidInput as e:
        got = e.code
    assert got == expected


@pytest.mark.parametrize("path", ["model.safetensors", "sub/dir/file.json", "tokenizer.model", "a b.txt"])
def test_clean_paths_accepted(path: str) -> None:
    assert clean_path(path) == path


@pytest.mark.parametrize("path", ["", "../x", "a/../b", "/etc/passwd", "a//b", "a/./b", "a\\b", "C:x", "a\nb",
                                  "x" * 256, "e\u0301"])
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(InvalidInput) as e:
        clean_path(path)
    assert e.value.code == "unsafe_path"


def test_fingerprint_and_content_hash_are_order_free() -> None:
    a = {"x": ["F32", [2, 3], "a.safetensors"], "y": ["BF16", [4], "b.safetensors"]}
    b = {"y": ["BF16", [4], "other.safetensors"], "x": ["F32", [2, 3], "z.safetensors"]}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "x": ["F16", [2, 3], "a"]})
    assert content_hash({"a": "1", "b": "2"}) == content_hash({"b": "2", "a": "1"})
    assert content_hash({"a": "1"}) != content_hash({"a": "2"})


def test_peft_embedding_and_fan_in_fan_out_shapes() -> None:
    from registry.weights.safetensors_header import HeaderEntry as TensorInfo

    def t(name: str, shape: tuple[int, ...]) -> TensorInfo:
        return TensorInfo(name, "F32", shape, 0, 0)

    tensors = {
        "base_model.model.embed.lora_embedding_A": t("a", (4, 100)),
        "base_model.model.embed.lora_embedding_B": t("b", (16, 4)),
        "base_model.model.h.0.attn.c_attn.lora_A.weight": t("c", (4, 16)),
        "base_model.model.h.0.attn.c_attn.lora_B.weight": t("d", (48, 4)),
    }
    spec = peft.parse_adapter({"fan_in_fan_out": True, "r": 4}, tensors, "adapter_model.safetensors")
    base = {"embed.weight": ["F32", [100, 16], "m"], "h.0.attn.c_attn.weight": ["F32", [16, 48], "m"]}
    assert peft.check_against_base(spec, base) == []
    base["h.0.attn.c_attn.weight"] = ["F32", [48, 16], "m"]
    assert [p["key"] for p in peft.check_against_base(spec, base)] == ["h.0.attn.c_attn.weight"]


@pytest.mark.parametrize("change", [
    {}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "gaussian"}, {"peft_type": None}, {"r": 4.0},
    {"r": 0}, {"arrow_config": {"top_k": 2}}, {"use_dora": True}, {"bias": "all"}, {"lora_alpha": float("nan")},
    {"rank_pattern": {"model.layers.0.self_attn.q_proj": 0}}, {"rank_pattern": []}, {"peft_type": "IA3"},
    {"modules_to_save": ["lm_head"]}, {"lora_alpha": 32}, {"use_rslora": True},
])
def test_push_and_math_agree_on_adapter_configs(tmp_path: Path, change: dict[str, object]) -> None:
    """A config the push accepts is one the weight math loads, and the other way round (they used
    to disagree: pissa init, a missing peft_type, r=4.0 and arrow_config pushed fine, then every
    job on them failed)."""
    from registry.demo import make_adapter
    from registry.weights.adapters import load_peft_adapter
    from registry.weights.errors import WeightsError

    folder = make_adapter(tmp_path / "a", r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    raw = json.dumps(cfg).encode()
    (folder / "adapter_config.json").write_bytes(raw)
    try:
        peft.parse_config(raw)
        pushed = True
    except InvalidInput:
        pushed = False
    try:
        load_peft_adapter(folder)
        loaded = True
    except WeightsError:
        loaded = False
    assert pushed == loaded, (change, pushed, loaded)


@pytest.mark.parametrize("header,data", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8),
    ({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, 2),
    ({"a": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}, 0),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1],
                                                                          "data_offsets": [4, 8]}}, 8),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8),
])
def test_push_and_math_read_headers_with_one_parser(tmp_path: Path, header: dict[str, object], data: int) -> None:
    """The push and the weight library agree on every header (one parser): a file the push refuses
    the library refuses; one the push accepts the library reads, or refuses only for a dtype torch
    cannot hold, saying so (an F4 tensor used to pass the push and fail the library's own parser)."""
    from registry.weights.checkpoint import read_header
    from registry.weights.errors import CheckpointFormatError

    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    try:
        read_header_from_file(path, file="m", max_header_bytes=1 << 20)
        pushed = True
    except InvalidInput:
        pushed = False
    try:
        read_header(path)
        loaded, why = True, ""
    except CheckpointFormatError as e:
        loaded, why = False, str(e)
    assert pushed == loaded or (pushed and "unsupported safetensors dtype" in why), (pushed, loaded, why)
