"""Fine-tuning transfer: exact arithmetic, rounding once, sharding, padding, skip/refuse, side files,
non-finite inputs, diagnostics, bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from registry.weights.checkpoint import INDEX_NAME, SafetensorsWriter, TensorSpec, open_checkpoint
from registry.weights.errors import NonFiniteError, ShapeMismatchError, WeightsError
from registry.weights.transfer import apply_diff, compute_diff, transfer

WriteCkpt = Callable[..., Path]
VOCAB, H = 10, 8


def base_model(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, H),
        "model.layers.0.self_attn.q_proj.weight": (H, H),
        "model.layers.0.mlp.up_proj.weight": (2 * H, H),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.norm.weight": (H,),
        "lm_head.weight": (VOCAB, H),
    }
    out = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    out["model.position_ids"] = torch.arange(5)
    return out


def perturbed(m: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t
        for n, t in m.items()
    }


def trio(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    s = base_model(dtype)
    return perturbed(s, 0.01, 1), s, perturbed(s, 0.05, 2)


def reference(f: torch.Tensor, s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Independent formula: t + α(f − s) in float32 (zero-padding s and t to f's rows), rounded once."""
    s32, t32 = s.float(), t.float()
    if f.shape[0] > s.shape[0]:
        pad = torch.zeros((f.shape[0] - s.shape[0],) + tuple(s.shape[1:]))
        s32, t32 = torch.cat([s32, pad]), torch.cat([t32, pad])
    return (t32 + alpha * (f.float() - s32)).to(t.dtype)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(torch.uint8)


def save3(
    write_ckpt: WriteCkpt,
    tmp_path: Path,
    f: dict[str, torch.Tensor],
    s: dict[str, torch.Tensor],
    t: dict[str, torch.Tensor],
) -> tuple[Path, Path, Path]:
    return write_ckpt(tmp_path / "ft", f), write_ckpt(tmp_path / "src", s), write_ckpt(tmp_path / "tgt", t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.3])
def test_transfer_is_exact_and_rounded_once(
    tmp_path: Path, write_ckpt: WriteCkpt, dtype: torch.dtype, alpha: float
) -> None:
    f, s, t = trio(dtype)
    paths = save3(write_ckpt, tmp_path, f, s, t)
    rep = transfer(*paths, tmp_path / "out", alpha=alpha, device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(t)
    for name, tt in t.items():
        assert out[name].dtype == tt.dtype and out[name].shape == tt.shape
        want = reference(f[name], s[name], tt, alpha) if tt.is_floating_point() else tt
        assert torch.equal(bits(out[name]), bits(want)), name
    assert rep.applied == 6 and rep.tensors == 7 and not rep.skipped
    assert [(c.name, c.reason) for c in rep.copied] == [("model.position_ids", "non_float")]


def test_sharded_inputs_and_outputs(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.bfloat16)
    fp = write_ckpt(tmp_path / "ft", f, shards=3)
    sp = write_ckpt(tmp_path / "src", s, shards=2)
    tp = tmp_path / "tgt.safetensors"
    write_ckpt(tmp_path / "t", t)
    (tmp_path / "t" / "model.safetensors").rename(tp)
    rep = transfer(fp, sp, tp, tmp_path / "out", max_shard_bytes=300)
    assert len(rep.files) > 2 and rep.files[-1] == INDEX_NAME
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(t)
    ck = open_checkpoint(tmp_path / "out")
    single = transfer(fp, sp, tp, tmp_path / "single.safetensors")
    assert single.files == ["single.safetensors"]
    ref = load_file(tmp_path / "single.safetensors")
    for name in t:
        assert torch.equal(ck.get(name), ref[name])
        if t[name].is_floating_point():
            assert torch.equal(bits(ref[name]), bits(reference(f[name], s[name], t[name], 1.0)))
    assert rep.bytes_written == sum((tmp_path / "out" / n).stat().st_size for n in rep.files if n != INDEX_NAME) + len(
        (tmp_path / "out" / INDEX_NAME).read_bytes()
    )


def test_vocabulary_growth_pads_with_zero_rows(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.float32)
    g = torch.Generator().manual_seed(9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        f[name] = torch.cat([f[name], torch.randn(3, H, generator=g)])
    files = {"config.json": json.dumps({"model_type": "x", "vocab_size": VOCAB, "hidden_size": H})}
    fp = write_ckpt(tmp_path / "ft", f)
    sp = write_ckpt(tmp_path / "src", s)
    tp = write_ckpt(tmp_path / "tgt", t, files=files)
    rep = transfer(fp, sp, tp, tmp_path / "out", alpha=0.5)
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (VOCAB + 3, H)
        assert torch.equal(out[name], reference(f[name], s[name], t[name], 0.5))
        assert torch.equal(out[name][VOCAB:], 0.5 * f[name][VOCAB:])
    assert sorted((p.name, p.rows_from, p.rows_to) for p in rep.padded) == [
        ("lm_head.weight", VOCAB, VOCAB + 3),
        ("model.embed_tokens.weight", VOCAB, VOCAB + 3),
    ]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg == {"model_type": "x", "vocab_size": VOCAB + 3, "hidden_size": H}
    assert rep.config_updates == {"vocab_size": [VOCAB, VOCAB + 3]}
    # the diff route pads the same way and gives the same bytes
    compute_diff(fp, sp, tmp_path / "diff")
    apply_diff(tp, tmp_path / "diff", tmp_path / "out2", alpha=0.5)
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()


def mismatched(tmp_path: Path, write_ckpt: WriteCkpt) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    f, s, t = trio(torch.float32)
    f["model.embed_tokens.weight"] = f["model.embed_tokens.weight"][: VOCAB - 2]  # fewer rows
    f["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2 * H, H + 1)  # other dims differ
    f["extra.head.weight"] = torch.zeros(2, 2)  # only in the fine-tune
    del f["model.norm.weight"]  # target tensor absent from the fine-tune
    del s["lm_head.weight"]  # fine-tune + target, no source tensor
    t["new.layer.weight"] = torch.ones(3)  # target only
    return *save3(write_ckpt, tmp_path, f, s, t), t


def test_skip_mode_keeps_target_tensors_and_reports(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    fp, sp, tp, t = mismatched(tmp_path, write_ckpt)
    rep = transfer(fp, sp, tp, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(t)
    skipped = {x.name: x.reason for x in rep.skipped}
    assert skipped == {
        "model.embed_tokens.weight": "fewer_rows",
        "model.layers.0.mlp.up_proj.weight": "shape_mismatch",
        "lm_head.weight": "missing_in_source_base",
        "extra.head.weight": "not_in_target",
    }
    copied = {x.name: x.reason for x in rep.copied}
    assert copied == {
        "model.norm.weight": "missing_in_finetune",
        "new.layer.weight": "missing_in_finetune",
        "model.position_ids": "non_float",
    }
    for name in list(skipped) + list(copied):
        if name in t:
            assert torch.equal(out[name], t[name]), name
    assert rep.applied == 2
    json.dumps(rep.as_dict())


def test_refuse_mode_raises_before_writing(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    fp, sp, tp, _ = mismatched(tmp_path, write_ckpt)
    with pytest.raises(ShapeMismatchError, match=r"4 tensor\(s\).*fewer_rows.*shape_mismatch"):
        transfer(fp, sp, tp, tmp_path / "out", on_mismatch="refuse")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "src", "tgt"]
    with pytest.raises(WeightsError, match="on_mismatch"):
        transfer(fp, sp, tp, tmp_path / "out", on_mismatch="ignore")  # type: ignore[arg-type]


def test_config_and_tokenizer_files(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.float32)
    fp = write_ckpt(
        tmp_path / "ft",
        f,
        files={
            "config.json": '{"from": "finetune"}',
            "tokenizer.json": '{"tok": "ft"}',
            "tokenizer_config.json": "{}",
            "chat_template.jinja": "{{ messages }}",
            "README.md": "not copied",
        },
    )
    sp = write_ckpt(tmp_path / "src", s, files={"config.json": '{"from": "source"}', "tokenizer.json": "{}"})
    tp = write_ckpt(
        tmp_path / "tgt",
        t,
        files={"config.json": '{"from": "target"}', "generation_config.json": "{}", "tokenizer.json": '{"tok": "t"}'},
    )
    rep = transfer(fp, sp, tp, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == '{"from": "target"}'
    assert (out / "tokenizer.json").read_text() == '{"tok": "ft"}'
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (out / "README.md").exists()
    assert rep.side_files == {
        "config.json": "target",
        "generation_config.json": "target",
        "tokenizer.json": "finetune",
        "tokenizer_config.json": "finetune",
        "chat_template.jinja": "finetune",
    }
    assert sorted(rep.files) == sorted(p.name for p in out.iterdir())
    # the diff keeps the fine-tune's tokenizer; applying it takes config from the target
    compute_diff(fp, sp, tmp_path / "diff")
    assert (tmp_path / "diff" / "tokenizer.json").read_text() == '{"tok": "ft"}'
    assert not (tmp_path / "diff" / "config.json").exists()
    rep2 = apply_diff(tp, tmp_path / "diff", tmp_path / "out2")
    assert rep2.side_files == rep.side_files | {k: "diff" for k, v in rep.side_files.items() if v == "finetune"}
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (tmp_path / "out2" / name).read_bytes() == (out / name).read_bytes()


def test_diff_is_float32_and_apply_matches_transfer(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.bfloat16)
    fp, sp, tp = save3(write_ckpt, tmp_path, f, s, t)
    d = compute_diff(fp, sp, tmp_path / "diff")
    delta = load_file(tmp_path / "diff" / "model.safetensors")
    assert {x.name: x.reason for x in d.skipped} == {"model.position_ids": "non_float"}
    for name, x in delta.items():
        assert x.dtype == torch.float32
        assert torch.equal(x, f[name].float() - s[name].float())
    transfer(fp, sp, tp, tmp_path / "a", alpha=0.7)
    apply_diff(tp, tmp_path / "diff", tmp_path / "b", alpha=0.7)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_diagnostics_match_float64_reference(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.float32)
    rep = transfer(*save3(write_ckpt, tmp_path, f, s, t), tmp_path / "out")
    names = [n for n in t if t[n].is_floating_point()]
    shift = torch.cat([(t[n].double() - s[n].double()).reshape(-1) for n in names])
    delta = torch.cat([(f[n].double() - s[n].double()).reshape(-1) for n in names])
    src = torch.cat([s[n].double().reshape(-1) for n in names])
    assert rep.relative_base_shift == pytest.approx(float(shift.norm() / src.norm()), rel=1e-5)
    assert rep.cosine == pytest.approx(float(shift @ delta / (shift.norm() * delta.norm())), rel=1e-4, abs=1e-6)
    assert rep.diff_norm == pytest.approx(float(delta.norm()), rel=1e-5)
    d = rep.as_dict()
    assert json.loads(json.dumps(d)) == d
    # identical source and target: zero shift, cosine undefined (None, not NaN)
    same = transfer(tmp_path / "ft", tmp_path / "src", tmp_path / "src", tmp_path / "same")
    assert same.relative_base_shift == 0.0 and same.cosine is None


@pytest.mark.parametrize("where", ["finetune", "source", "target"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_are_refused(tmp_path: Path, write_ckpt: WriteCkpt, where: str, bad: float) -> None:
    f, s, t = trio(torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    victim = {"finetune": f, "source": s, "target": t}[where]
    victim[name] = victim[name].clone()
    victim[name][3, 4] = bad
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        transfer(*save3(write_ckpt, tmp_path, f, s, t), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overflow_of_the_output_dtype_is_refused(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    f, s, t = trio(torch.float16)
    name = "model.norm.weight"
    f[name] = torch.full((H,), 60000.0, dtype=torch.float16)
    t[name] = torch.full((H,), 30000.0, dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="overflows torch.float16"):
        transfer(*save3(write_ckpt, tmp_path, f, s, t), tmp_path / "out")


def test_output_must_be_new(tmp_path: Path, write_ckpt: WriteCkpt) -> None:
    paths = save3(write_ckpt, tmp_path, *trio(torch.float32))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("occupied")
    with pytest.raises(WeightsError, match="not an empty directory"):
        transfer(*paths, tmp_path / "out")
    with pytest.raises(WeightsError, match="alpha must be finite"):
        transfer(*paths, tmp_path / "o2", alpha=math.inf)
    (tmp_path / "empty").mkdir()
    transfer(*paths, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").exists()


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from registry.weights.transfer import transfer

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    try:  # reset the peak after imports; VmHWM belongs to this exec'd process only
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = status("VmRSS")
    f, s, t, out = sys.argv[1:5]
    rep = transfer(f, s, t, out, device="cpu")
    print(json.dumps({"growth": status("VmHWM") - base, "applied": rep.applied}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for peak RSS")
def test_peak_memory_stays_at_a_few_tensors(tmp_path: Path) -> None:
    n_tensors, shape = 25, (2500, 2000)  # 25 x 20 MB float32 = 500 MB per model
    specs = [TensorSpec(f"layers.{i}.weight", torch.float32, shape) for i in range(n_tensors)]
    largest = specs[0].nbytes
    for model, offset in {"src": 0.0, "ft": 0.01, "tgt": 0.02}.items():
        with SafetensorsWriter(tmp_path / f"{model}.safetensors", specs) as w:
            for i, spec in enumerate(specs):
                w.write(spec.name, torch.full(shape, 0.001 * i + offset))
    args = [str(tmp_path / f"{m}.safetensors") for m in ("ft", "src", "tgt")] + [str(tmp_path / "out")]
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {result['growth'] / 1e6:.1f} MB (largest tensor {largest / 1e6:.0f} MB)")
    assert result["applied"] == n_tensors
    assert result["growth"] < 8 * largest, f"peak RSS grew by {result['growth'] / 1e6:.0f} MB"
    out = open_checkpoint(tmp_path / "out")
    x = torch.empty(10)
    out.read_into("layers.7.weight", x, 123)
    assert torch.allclose(x, torch.full((10,), 0.007 + 0.02 + 0.01))
    out.close()


def test_chunking_never_changes_a_bit(tmp_path: Path, write_ckpt: WriteCkpt, monkeypatch: pytest.MonkeyPatch) -> None:
    import registry.weights.transfer as transfer_module

    f, s, t = trio(torch.bfloat16)
    f["lm_head.weight"] = torch.cat([f["lm_head.weight"], torch.ones(3, H, dtype=torch.bfloat16)])  # padding
    paths = save3(write_ckpt, tmp_path, f, s, t)
    whole = transfer(*paths, tmp_path / "whole.safetensors", alpha=0.3)
    monkeypatch.setattr(transfer_module, "CHUNK", 7)  # chunks straddle rows and the padding boundary
    small = transfer(*paths, tmp_path / "small.safetensors", alpha=0.3)
    assert (tmp_path / "small.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert small.cosine == pytest.approx(whole.cosine, rel=1e-5)
