"""plan_transfer streams exactly the bytes transfer() writes, for any byte ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from registry.demo import Shape, make_demo, random_weights, save_checkpoint
from registry.weights.transfer import transfer
from registry.weights.transfer_stream import plan_transfer, tensor_index


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    paths = make_demo(root / "demo")
    w = random_weights(Shape(), seed=0)
    grown = {k: v + 0.001 for k, v in w.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # vocabulary growth: 8 new rows
        grown[k] = torch.cat([grown[k], torch.randn(8, 64, generator=torch.Generator().manual_seed(1))])
    paths["grown"] = save_checkpoint(root / "grown", grown)
    return paths


@pytest.mark.parametrize("finetune,alpha,shard", [("finetune", 1.0, None), ("finetune", 0.7, 100_000),
                                                  ("grown", 1.0, None)])
def test_stream_equals_transfer_output(inputs: dict[str, Path], tmp_path: Path, finetune: str, alpha: float,
                                       shard: int | None) -> None:
    out = tmp_path / "out"
    rep = transfer(inputs[finetune], inputs["base"], inputs["base-v2"], out, alpha, max_shard_bytes=shard)
    plan = plan_transfer(inputs[finetune], inputs["base"], inputs["base-v2"], alpha, max_shard_bytes=shard)
    try:
        sizes = plan.file_sizes()
        side = {sf.name: sf for sf in plan.side_files}
        assert sorted([*sizes, *side]) == sorted(rep.files)
        for name, size in sizes.items():
            whole = b"".join(plan.iter_file(name))
            assert len(whole) == size and whole == (out / name).read_bytes()
            for step in (1, 4093, size // 3 + 1):
                if step == 1:
                    pieces = [b"".join(plan.iter_file(name, a, a + 1)) for a in range(0, min(size, 300))]
                    assert b"".join(pieces) == whole[:300]
                    continue
                parts = b"".join(b"".join(plan.iter_file(name, a, min(size, a + step))) for a in range(0, size, step))
                assert parts == whole
        for name, sf in side.items():
            expected = (out / name).read_bytes()
            assert (sf.data if sf.data is not None else sf.source.read_bytes()) == expected
        assert plan.report.padded == rep.padded and plan.report.skipped == rep.skipped
        assert set(tensor_index(plan)) == {n for lay in plan.layout.files.values() for n in lay.order}
    finally:
        plan.close()
