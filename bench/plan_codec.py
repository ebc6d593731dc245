"""The entropy coder of compression plans on the codes of a real plan: the rANS stream (compiled and
pure-Python reference) against zstandard on the same codes, and where the time of rebuilding a member
goes (``load_plan``, ``reconstruct``, ``save_peft_adapter``; CPU time, best of ``--repeat``).

    python bench/plan_codec.py                          # the adapters of bench/serve.py's plan row
    python bench/plan_codec.py --plan some.safetensors  # any saved plan

The codes are captured while members are reconstructed (the decoder the planner's module uses is
wrapped for the run), so they are exactly the codes the stored streams hold. zstd gets each stream's
codes as int8 when they fit, else int16 (little-endian), at levels 3 and 19, and on zigzag bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import make_adapter  # noqa: E402
from registry.weights import codec, compress  # noqa: E402
from registry.weights.adapters import WEIGHTS_NAME, load_peft_adapter, save_peft_adapter  # noqa: E402


def build_plan(folder: Path, adapters: int, layers: int, rank: int, budget: float) -> Path:
    ads = [load_peft_adapter(make_adapter(folder / f"p{i}", layers, 2048, rank, 100 + i)) for i in range(adapters)]
    t = time.process_time()
    p = compress.plan(ads, max_error=budget, names=[f"bench-plan-{i}" for i in range(adapters)])
    print(f"planned {adapters} adapters in {time.process_time() - t:.1f} s CPU")
    path = folder / "plan.safetensors"
    compress.save_plan(p, path)
    return path


def capture(plan: compress.CompressionPlan) -> list[dict[str, Any]]:
    """Per rANS stream decoded while reconstructing every member of a freshly loaded ``plan`` (so its
    bases are decoded too): its bytes, rows and codes."""
    streams: list[dict[str, Any]] = []
    original = codec.RansDecoder

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, data: bytes, **kw: Any) -> None:
            super().__init__(data, **kw)
            streams.append({"data": bytes(data), "rows": [], "codes": []})

        def read_rows(self, rows: Any) -> np.ndarray:
            out = super().read_rows(rows)
            streams[-1]["rows"] += list(rows)
            streams[-1]["codes"].append(out)
            return out

    codec.RansDecoder = Recording  # type: ignore[misc]
    try:
        for i in range(len(plan.members)):
            plan.reconstruct(i)
    finally:
        codec.RansDecoder = original  # type: ignore[misc]
    for s in streams:
        s["codes"] = np.concatenate(s["codes"]) if s["codes"] else np.zeros(0, np.int64)
    return [s for s in streams if s["data"]]


def zigzag(c: np.ndarray) -> bytes:
    z = ((c << 1) ^ (c >> 63)).astype(np.uint64)
    out = bytearray()
    for v in z.tolist():  # LEB128
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def fixed(c: np.ndarray) -> bytes:
    return (c.astype(np.int8) if c.size == 0 or int(np.abs(c).max()) < 128 else c.astype("<i2")).tobytes()


def cpu(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", type=Path, help="a saved plan (default: plan bench/serve.py's adapters)")
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4, help="layers of 4 modules 2048 × 2048 (serve.py: 4 at 128 MB)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(".bench-data/plan-codec"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.plan is None:
        shutil.rmtree(args.data, ignore_errors=True)
        args.plan = build_plan(args.data, args.adapters, args.layers, args.rank, args.budget)
    plan = compress.load_plan(args.plan)
    streams = capture(plan)
    n_codes = sum(int(s["codes"].size) for s in streams)
    rans = sum(len(s["data"]) for s in streams)
    ideal = 0.0
    for s in streams:
        at = 0
        for n, q, K in s["rows"]:
            ideal += float(codec.code_lengths(torch.from_numpy(s["codes"][at:at + n]), q, K).sum()) / 8
            at += n
    print(f"\n{len(streams)} rANS streams, {n_codes} codes, plan file {args.plan.stat().st_size} bytes\n")
    print("| coder (same codes) | bytes | vs rANS | decode (ms CPU) |")
    print("|---|---:|---:|---:|")
    print(f"| ideal code length under the plan's Laplace models | {ideal:.0f} | {ideal / rans:.3f} | – |")

    def dec_compiled() -> None:
        for s in streams:
            codec.RansDecoder(s["data"]).read_rows(s["rows"])

    def dec_reference() -> None:
        for s in streams:
            codec.RansDecoder(s["data"], reference=True).read_rows(s["rows"])

    for s in streams:  # the compiled coder and the reference agree on these streams
        enc = codec.RansEncoder()
        at = 0
        for n, q, K in s["rows"]:
            enc.push(s["codes"][at:at + n], q, K)
            at += n
        assert enc.finish() == s["data"]
    t_c = cpu(dec_compiled, args.repeat)
    t_r = cpu(dec_reference, 1)
    print(f"| rANS, compiled (stored) | {rans} | 1.000 | {t_c * 1e3:.1f} |")
    print(f"| rANS, pure-Python reference | {rans} | 1.000 | {t_r * 1e3:.0f} |")
    for label, serial in (("int8/int16", fixed), ("zigzag LEB128", zigzag)):
        raw = [serial(s["codes"]) for s in streams]
        for level in (3, 19):
            comp = [zstandard.ZstdCompressor(level=level).compress(r) for r in raw]
            size = sum(len(c) for c in comp)
            dctx = zstandard.ZstdDecompressor()
            t = cpu(lambda comp=comp, dctx=dctx: [dctx.decompress(c) for c in comp], args.repeat)
            print(f"| zstd -{level} on {label} codes | {size} | {size / rans:.3f} | {t * 1e3:.1f} |")

    print("\n| member | method | load_plan (ms) | load_plan + reconstruct (ms) | save_peft_adapter (ms) | sha256 |")
    print("|---|---|---:|---:|---:|---|")
    out = args.data / "rebuilt"
    for i, m in enumerate(plan.members):
        t_load = cpu(lambda: compress.load_plan(args.plan), args.repeat)
        t_rec = cpu(lambda i=i: compress.load_plan(args.plan).reconstruct(i), args.repeat)  # bases decoded too
        ad = compress.load_plan(args.plan).reconstruct(i)
        t_save = cpu(lambda ad=ad, i=i: save_peft_adapter(ad, out / str(i)), args.repeat)
        digest = hashlib.sha256((out / str(i) / WEIGHTS_NAME).read_bytes()).hexdigest()[:16]
        print(f"| {m.name} | {m.method} | {t_load * 1e3:.1f} | {t_rec * 1e3:.1f} | {t_save * 1e3:.1f} | {digest} |")


if __name__ == "__main__":
    main()
