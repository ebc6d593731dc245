"""The packed-storage codec against the pure-numpy codec it replaced, in one process, frame by frame.

``tests/weights/packing_reference.py`` is the codec as main shipped it before the compiled kernels. Both
code and decode the same 4 MiB frames (the registry bench's synthetic corpus: init-like weights, a fine-tune
with a 1 % Gaussian delta per tensor), taking turns; each number is the minimum CPU time over ``--repeat``
runs, in ms per MiB of frame (``time.process_time``: the load of a shared machine moves it less than wall
time). Every payload is checked to be byte-identical between the two.

    python bench/storage_codec_ab.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry.weights import packing  # noqa: E402
from tests.weights import packing_reference as before  # noqa: E402


def frames(dtype: torch.dtype, n: int) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g) * 0.02
    tuned = base + torch.randn(n, generator=g) * base.std() * 0.01
    return (base.to(dtype).view(torch.uint8).numpy().tobytes(), tuned.to(dtype).view(torch.uint8).numpy().tobytes())


def best(fn: Callable[[], object], repeat: int) -> float:
    out = float("inf")
    for _ in range(repeat):
        c = time.process_time()
        fn()
        out = min(out, time.process_time() - c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    packing.warm()
    print(f"\nCodec A/B, one process, 4 MiB frames; load average {os.getloadavg()[0]:.1f}; CPU ms per MiB "
          f"(min of {args.repeat})\n")
    print("| frame | step | before (numpy) | after (kernels) | speed-up | payload identical |")
    print("|---|---|---:|---:|---:|---|")
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float32, "F32")):
        base, tuned = frames(dtype, (4 << 20) // (2 if name == "BF16" else 4))
        mib = len(base) / 2**20
        for label, data, ref in ((f"{name} fine-tune vs base", tuned, base), (f"{name} base", base, None)):
            old_p = before.encode(data, name, ref)
            new_p = packing.encode(data, name, ref)
            same = old_p == new_p and packing.decode(old_p, ref) == data and before.decode(new_p, ref) == data
            times: dict[str, list[float]] = {"before": [], "after": []}
            for tag, m, p in (("before", before, old_p), ("after", packing, new_p)):
                def enc(m=m, d=data, r=ref, k=name):  # type: ignore[no-untyped-def]
                    return m.encode(d, k, None if r is None else m.Reference(r))

                times[tag].append(best(enc, args.repeat))
                times[tag].append(best(lambda m=m, p=p, r=ref: m.decode(p, None if r is None else m.Reference(r)),
                                       args.repeat))
            for i, step in enumerate(("encode", "decode")):
                o, n = times["before"][i] * 1e3 / mib, times["after"][i] * 1e3 / mib
                print(f"| {label} | {step} | {o:.2f} | {n:.2f} | {o / n:.2f}× | {'yes' if same else '**NO**'} |")


if __name__ == "__main__":
    main()
