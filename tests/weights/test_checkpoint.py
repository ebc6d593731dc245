"""Streamed safetensors checkpoints: layout == save_file, writers, sharding, lazy reading, errors."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from registry.weights.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointOutput,
    SafetensorsWriter,
    ShardedWriter,
    TensorSpec,
    iter_safetensors_bytes,
    open_checkpoint,
    safetensors_layout,
    safetensors_range,
    sharded_layout,
)
from registry.weights.errors import CheckpointFormatError, ShapeMismatchError, WeightsError

ODD_NAMES = ['q"uote', "back\\slash", "nl\nx", "ctl\x01\x1f\x7f", "é☃𝄞", "tab\t", "\u2028", "a.b.0.weight"]


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {n: torch.randn(3, 2, generator=g) for n in ODD_NAMES}
    for dt in (
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    ):
        t[f"x.{dt}"] = (torch.randn(2, 3, generator=g) * 10).to(dt)
    t["empty"] = torch.zeros(0, 4)
    t["scalar"] = torch.tensor(3.5)
    t["big.bf16"] = torch.randn(17, 5, generator=g).to(torch.bfloat16)
    return t


def write_shuffled(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    names = list(tensors)
    random.Random(1).shuffle(names)
    with SafetensorsWriter(path, [TensorSpec.of(n, tensors[n]) for n in names], metadata) as w:
        random.Random(2).shuffle(names)
        for n in names:
            w.write(n, tensors[n])


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_writer_is_byte_identical_to_save_file(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    write_shuffled(tmp_path / "mine.safetensors", tensors, metadata)
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_multi_key_metadata_is_sorted_and_otherwise_identical(tmp_path: Path) -> None:
    # save_file writes 2+ metadata keys in Rust HashMap order (varies per run); ours sorts them.
    tensors = mixed_tensors()
    meta = {f"k{i}": str(i) for i in (3, 1, 2, 0)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata=meta)
    write_shuffled(tmp_path / "a.safetensors", tensors, meta)
    write_shuffled(tmp_path / "b.safetensors", tensors, dict(reversed(list(meta.items()))))
    ref, mine = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "a.safetensors").read_bytes()
    assert mine == (tmp_path / "b.safetensors").read_bytes()
    n_ref, n_mine = struct.unpack("<Q", ref[:8])[0], struct.unpack("<Q", mine[:8])[0]
    assert n_ref == n_mine and ref[8 + n_ref :] == mine[8 + n_mine :]
    assert json.loads(ref[8 : 8 + n_ref]) == json.loads(mine[8 : 8 + n_mine])
    assert list(json.loads(mine[8 : 8 + n_mine])["__metadata__"]) == ["k0", "k1", "k2", "k3"]


def test_layout_known_before_tensors_exist(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    layout = safetensors_layout(specs, {"format": "pt"})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    data = (tmp_path / "ref.safetensors").read_bytes()
    assert layout.total_size == len(data)
    assert data.startswith(layout.header) and layout.header[8:].startswith(b"{")
    streamed = b"".join(iter_safetensors_bytes(layout, tensors.__getitem__))
    assert streamed == data
    order = sorted(layout.order, key=lambda n: layout.offsets[n][0])
    assert list(layout.order) == order


def test_any_range_streams_the_files_bytes_reading_only_what_it_covers(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    layout = safetensors_layout([TensorSpec.of(n, t) for n, t in tensors.items()], {"format": "pt"})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    data = (tmp_path / "ref.safetensors").read_bytes()
    asked: list[str] = []

    def read(name: str, lo: int, hi: int) -> bytes:
        asked.append(name)
        return bytes(tensors[name].reshape(-1).contiguous().view(torch.uint8)[lo:hi].tolist())

    size = layout.total_size
    rng = random.Random(0)
    cuts = [(0, size), (0, 1), (size - 1, size), (len(layout.header) - 3, len(layout.header) + 5)]
    cuts += [tuple(sorted(rng.sample(range(size + 1), 2))) for _ in range(40)]
    for start, end in cuts:
        asked.clear()
        assert b"".join(safetensors_range(layout, start, end, read, piece=5)) == data[start:end]
        for name in set(asked):
            b, e = layout.offsets[name]
            assert len(layout.header) + b < end and len(layout.header) + e > start  # overlapped


def test_readers_read_what_we_write(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    write_shuffled(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "m.safetensors")
    assert set(loaded) == set(tensors)
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(
            loaded[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        )
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_validates_and_never_leaves_partial_files(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.bfloat16, (4,))]
    path = tmp_path / "w.safetensors"
    with pytest.raises(ShapeMismatchError, match="'a'"), SafetensorsWriter(path, specs) as w:
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ShapeMismatchError, match="bfloat16"), SafetensorsWriter(path, specs) as w:
        w.write("b", torch.zeros(4))
    with pytest.raises(WeightsError, match="not declared"), SafetensorsWriter(path, specs) as w:
        w.write("zzz", torch.zeros(1))
    with pytest.raises(WeightsError, match="not \\(fully\\) written"), SafetensorsWriter(path, specs) as w:
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(WeightsError, match="twice"), SafetensorsWriter(path, specs) as w:
        w.write("a", torch.zeros(2, 3))
        w.write("a", torch.zeros(2, 3))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WeightsError, match="duplicate"):
        safetensors_layout([specs[0], specs[0]])
    with pytest.raises(WeightsError, match="invalid tensor name"):
        safetensors_layout([TensorSpec("__metadata__", torch.float32, (1,))])


def test_write_range_in_chunks(tmp_path: Path) -> None:
    x = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    path = tmp_path / "c.safetensors"
    with SafetensorsWriter(path, [TensorSpec.of("x", x)]) as w:
        with pytest.raises(WeightsError, match="out of order"):
            w.write_range("x", 3, x.reshape(-1)[3:6])
        w.write_range("x", 0, x.reshape(-1)[:4])
        w.write_range("x", 4, x.reshape(-1)[4:])
    assert torch.equal(load_file(path)["x"], x)


def test_sharded_writer_and_index(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.w": torch.randn(10, 10, generator=g) for i in range(5)}  # 400 B each
    tensors["big"] = torch.randn(50, 10, generator=g)  # 2000 B > limit: own shard
    tensors["ids"] = torch.arange(7)
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    lay = sharded_layout(specs, 1000, {"format": "pt"})
    with ShardedWriter(tmp_path / "ck", specs, 1000, {"format": "pt"}) as w:
        for n in reversed(list(tensors)):
            w.write(n, tensors[n])
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == sorted([*lay.files, INDEX_NAME])
    # greedy: [l0 l1] [l2 l3] [l4] [big] [ids] (big alone exceeds the limit, ids no longer fits)
    assert list(lay.files) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "ck" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert index["weight_map"] == dict(sorted(lay.weight_map.items()))
    assert {n: index["weight_map"][n] for n in ("layer.0.w", "layer.1.w", "big")} == {
        "layer.0.w": "model-00001-of-00005.safetensors",
        "layer.1.w": "model-00001-of-00005.safetensors",
        "big": "model-00004-of-00005.safetensors",
    }
    for fname, layout in lay.files.items():
        assert (tmp_path / "ck" / fname).stat().st_size == layout.total_size
        for n, t in load_file(tmp_path / "ck" / fname).items():
            assert torch.equal(t, tensors[n])
    ck = open_checkpoint(tmp_path / "ck")
    assert set(ck.names) == set(tensors) and len(ck.files) == 5
    for n, t in tensors.items():
        assert torch.equal(ck.get(n), t)
    # one shard when everything fits: plain model.safetensors, no index
    with ShardedWriter(tmp_path / "one", specs, None) as w:
        for n, t in tensors.items():
            w.write(n, t)
    assert [p.name for p in (tmp_path / "one").iterdir()] == [SINGLE_NAME]


def test_checkpoint_lazy_reading(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "x.safetensors")
    (tmp_path / "d").mkdir()
    save_file(tensors, tmp_path / "d" / SINGLE_NAME, metadata={"format": "pt"})
    for path in (tmp_path / "x.safetensors", tmp_path / "d"):
        with open_checkpoint(path) as ck:
            assert ck.info("a").shape == (3, 4) and ck.info("b").dtype == torch.bfloat16
            assert ck.nbytes == 48 + 10
            buf = torch.empty(5)
            assert ck.read_into("a", buf, 6).tolist() == [6.0, 7.0, 8.0, 9.0, 10.0]
            assert torch.equal(ck.get("b"), tensors["b"])
            with pytest.raises(WeightsError, match="beyond"):
                ck.read_into("a", torch.empty(7), 6)
            with pytest.raises(CheckpointFormatError, match="no tensor 'c'"):
                ck.info("c")
    assert open_checkpoint(tmp_path / "d").directory == tmp_path / "d"
    assert open_checkpoint(tmp_path / "d").metadata == {"format": "pt"}


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sh"
    specs = [TensorSpec(f"t{i}", torch.float32, (4,)) for i in range(4)]
    with ShardedWriter(d, specs, 32) as w:
        for s in specs:
            w.write(s.name, torch.zeros(4))
    return d


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="no model.safetensors.*found other.safetensors"):
        open_checkpoint(tmp_path / "empty")
    # truncated file / bad header
    save_file({"a": torch.zeros(4)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointFormatError, match="file size"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{x}!")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        open_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointFormatError, match="header length"):
        open_checkpoint(tmp_path / "huge.safetensors")


def test_bad_sharded_index(tmp_path: Path) -> None:
    d = _sharded(tmp_path)
    index = d / INDEX_NAME
    good = json.loads(index.read_text())
    shards = sorted(p for p in d.glob("model-*.safetensors"))
    assert len(shards) == 2 and len(open_checkpoint(d)) == 4

    index.write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="not a valid index JSON"):
        open_checkpoint(d)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointFormatError, match="weight_map"):
        open_checkpoint(d)
    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "t0": "../evil.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="outside"):
        open_checkpoint(d)
    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "t9": shards[0].name}}))
    with pytest.raises(CheckpointFormatError, match="'t9' is not in shard"):
        open_checkpoint(d)
    wm = dict(good["weight_map"])
    del wm["t0"]
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointFormatError, match="not in weight_map"):
        open_checkpoint(d)
    # duplicate tensor names across shards
    save_file({"t0": torch.zeros(4), "t2": torch.zeros(4)}, shards[1])
    index.write_text(json.dumps(good))
    with pytest.raises(CheckpointFormatError, match="'t0' appears in both"):
        open_checkpoint(d)
    shards[1].unlink()
    with pytest.raises(CheckpointFormatError, match="missing"):
        open_checkpoint(d)


def test_checkpoint_output_is_atomic(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,))]
    out = CheckpointOutput(tmp_path / "o", specs)
    out.writer.write("a", torch.ones(2))
    assert not (tmp_path / "o").exists()
    assert out.finish() == [SINGLE_NAME]
    assert torch.equal(load_file(tmp_path / "o" / SINGLE_NAME)["a"], torch.ones(2))
    with pytest.raises(WeightsError, match="not an empty directory"):
        CheckpointOutput(tmp_path / "o", specs)
    failed = CheckpointOutput(tmp_path / "p", specs)
    failed.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
