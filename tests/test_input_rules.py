"""Input rules, checked without a server (issue 9, "lose nothing, answer every input"): ASCII-only
version numbers, fullmatch names, bounded JSON depth, consistent tensor shapes, tag budgets and
strict HTTP Range parsing. The same inputs go through the HTTP API in tests/test_bad_input.py."""

from __future__ import annotations

import json
import struct

import pytest

from registry.api.ranges import parse_range
from registry.errors import InvalidInput, RegistryError
from registry.formats import jsonfile, peft
from registry.formats.inspect import FileSource, check_single_file
from registry.formats.safetensors import check_stream, parse_header
from registry.services import names
from registry.services.refs import parse_ref


def st_bytes(header: dict[str, object] | bytes, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# --------------------------------------------------------------------------- 1. version numbers


@pytest.mark.parametrize("ref", ["m@²", "m@١", "m@１", "m@٣٤", "m@1²", "m@+1", "m@1_0", "m@ 1", "m@1 "])
def test_only_ascii_digits_make_a_version_number(ref: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_ref(ref)
    assert e.value.code == "invalid_ref"


def test_ascii_version_numbers_still_parse() -> None:
    assert parse_ref("m@12").version == 12
    assert parse_ref("m@prod").alias == "prod"
    assert parse_ref("m").version is None


@pytest.mark.parametrize("text,value", [("0", 0), ("17", 17), ("²", None), ("١", None), ("1_0", None),
                                        ("+1", None), (" 1", None), ("", None), ("1\n", None), ("-1", None)])
def test_ascii_uint(text: str, value: int | None) -> None:
    assert names.ascii_uint(text) == value


# --------------------------------------------------------------------------- 3. trailing newlines


@pytest.mark.parametrize("check,value", [
    (names.model_name, "demo-base\n"), (names.alias_name, "prod\n"),
    (lambda k: names.tag(k, "v"), "stage\n"),
])
def test_trailing_newline_refused(check, value: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput):
        check(value)


@pytest.mark.parametrize("ref", ["demo-base\n", "demo-base\n@1", "demo-base@prod\n"])
def test_trailing_newline_in_ref_refused(ref: str) -> None:
    with pytest.raises(InvalidInput):
        parse_ref(ref)


# --------------------------------------------------------------------------- 5. tag budget


def test_tag_count_and_size_budget() -> None:
    names.tag_budget({f"k{i}": "v" for i in range(256)}, max_count=256, max_bytes=1 << 20)
    with pytest.raises(InvalidInput) as e:
        names.tag_budget({f"k{i}": "v" for i in range(257)}, max_count=256, max_bytes=1 << 20)
    assert e.value.code == "too_many_tags" and e.value.status == 422
    with pytest.raises(InvalidInput) as e:
        names.tag_budget({f"k{i}": "v" * 1000 for i in range(10)}, max_count=256, max_bytes=4096)
    assert e.value.code == "tags_too_large"


# --------------------------------------------------------------------------- 2. nested JSON


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize("depth", [100_000, 200_000])
def test_deep_json_in_safetensors_header(depth: int) -> None:
    inner = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": ' + \
        _deep(depth) + b"}}"
    data = st_bytes(inner, b"\0" * 4)
    with pytest.raises(InvalidInput) as e:
        parse_header(lambda o, n: data[o:o + n], len(data), file="m.safetensors", max_header_bytes=16 << 20)
    assert e.value.code == "invalid_safetensors" and "nest" in e.value.message
    with pytest.raises(InvalidInput):
        check_stream([data], file="m.safetensors", max_header_bytes=16 << 20)


def _src(path: str, raw: bytes) -> FileSource:
    return FileSource(path=path, sha256="0" * 64, size=len(raw), read_at=lambda o, n: raw[o:o + n],
                      iter_bytes=lambda: iter([raw]))


@pytest.mark.parametrize("path", ["adapter_config.json", "model.safetensors.index.json"])
def test_deep_json_files(path: str) -> None:
    raw = b'{"weight_map": ' + _deep(150_000) + b"}"
    with pytest.raises(InvalidInput) as e:
        check_single_file(_src(path, raw), max_header_bytes=1 << 20, check_finite=False)
    assert e.value.code == "invalid_json"
    with pytest.raises(InvalidInput):
        peft.parse_config(raw)


def test_json_loader_bounds() -> None:
    assert jsonfile.loads(b'{"a": [1, {"b": "[[[[[["}]}', file="x.json") == {"a": [1, {"b": "[[[[[["}]}
    assert jsonfile.loads(_deep(jsonfile.MAX_DEPTH), file="x.json") is not None
    with pytest.raises(InvalidInput):
        jsonfile.loads(_deep(jsonfile.MAX_DEPTH + 1), file="x.json")
    assert jsonfile.loads(b'"\\"' + b"[" * 100 + b'"', file="x.json") == '"' + "[" * 100


# --------------------------------------------------------------------------- 4. tensor shapes


@pytest.mark.parametrize("shape,span", [
    ([0, 10**30], 0),
    ([10**30, 0], 0),
    ([2**40, 2**40, 0], 0),
    ([-1], 0),
    ([2**64], 0),
    ([1.5], 0),
    ([True], 0),
])
def test_shapes_validated(shape: list[object], span: int) -> None:
    data = st_bytes({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, span]}}, b"\0" * span)
    with pytest.raises(InvalidInput) as e:
        parse_header(lambda o, n: data[o:o + n], len(data), file="m.safetensors", max_header_bytes=1 << 20)
    assert e.value.code == "invalid_safetensors"
    with pytest.raises(InvalidInput):
        check_stream([data], file="m.safetensors", max_header_bytes=1 << 20)


def test_empty_tensor_still_fine() -> None:
    data = st_bytes({"a": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    h = parse_header(lambda o, n: data[o:o + n], len(data), file="m.safetensors", max_header_bytes=1 << 20)
    assert h.tensors["a"].shape == (0, 4)


# --------------------------------------------------------------------------- 7. Range


@pytest.mark.parametrize("header", ["bytes=1_0-2_0", "bytes=+1-2", "bytes= 1-2", "bytes=1 -2", "bytes=١-٢",
                                    "bytes=-1_0", "bytes=-+5", "bytes=0x1-2", "bytes=1-2-3", "bytes=²-"])
def test_invalid_range_is_ignored(header: str) -> None:
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header,expected", [
    ("bytes=10-20", (10, 21)), ("bytes=10-", (10, 100)), ("bytes=-5", (95, 100)), ("BYTES=0-0", (0, 1)),
    ("bytes=90-500", (90, 100)), (" bytes=1-2 ", (1, 3)),
])
def test_valid_ranges(header: str, expected: tuple[int, int]) -> None:
    assert parse_range(header, 100) == expected


def test_unsatisfiable_range() -> None:
    with pytest.raises(RegistryError) as e:
        parse_range("bytes=100-", 100)
    assert e.value.status == 416


# --------------------------------------------------------------------------- adapter configs


_CFG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}


@pytest.mark.parametrize("change,code", [
    ({"r": None}, "invalid_adapter"), ({"r": 0}, "invalid_adapter"), ({"r": -4}, "invalid_adapter"),
    ({"r": 4.5}, "invalid_adapter"), ({"r": "4"}, "invalid_adapter"), ({"r": True}, "invalid_adapter"),
    ({"lora_alpha": "8"}, "invalid_adapter"), ({"peft_type": None}, "invalid_adapter"),
    ({"peft_type": "IA3"}, "unsupported_adapter"), ({"use_qalora": True}, "unsupported_adapter"),
    ({"init_lora_weights": "pissa"}, "unsupported_adapter"), ({"trainable_token_indices": [1]}, "unsupported_adapter"),
])
def test_adapter_config_rules(change: dict[str, object], code: str) -> None:
    cfg = {k: v for k, v in {**_CFG, **change}.items() if v is not None}
    with pytest.raises(InvalidInput) as e:
        peft.parse_config(json.dumps(cfg).encode())
    assert e.value.code == code


def _factors(r: int, module: str = "q_proj") -> dict[str, object]:
    from registry.weights.safetensors_header import HeaderEntry as TensorInfo

    p = f"base_model.model.model.layers.0.self_attn.{module}"
    return {f"{p}.lora_A.weight": TensorInfo("a", "F32", (r, 16), 0, 0),
            f"{p}.lora_B.weight": TensorInfo("b", "F32", (16, r), 0, 0)}


def test_adapter_config_must_describe_its_factors() -> None:
    assert peft.parse_adapter(dict(_CFG), _factors(4), "a.safetensors").modules  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="rank 8"):
        peft.parse_adapter(dict(_CFG), _factors(8), "a.safetensors")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="target_modules"):
        peft.parse_adapter(dict(_CFG), _factors(4, "v_proj"), "a.safetensors")  # type: ignore[arg-type]
