"""Two ways to produce the derived artifacts: through a live registry (:class:`ApiBackend`), or
by calling ``registry.weights`` directly (:class:`DirectBackend`, ``--direct``).

:class:`ApiBackend` starts a real server, ``python -m registry up`` with its embedded worker and
dispatcher, in a temporary ``REGISTRY_HOME`` on a free loopback port (``REGISTRY_MLFLOW_UI=false``),
and uses only :class:`registry.client.RegistryClient`: it pushes the bases, adapters and fine-tunes,
requests RMM bases, merges and transfers as jobs, waits for them, pulls the results (every file's
sha256 is verified by the client) and loads them with ``registry.weights`` (``load_basis``,
``load_peft_adapter``). Predictions are stored with ``store_predictions`` and MUSCLE metrics come from
``compat``. The server is stopped with SIGINT (Ctrl-C), which shuts its worker and dispatcher down too.

:class:`DirectBackend` computes the same artifacts in-process with the same library functions
(``fit_basis``, ``merge_adapters``, ``transfer``, ``classification_compat``), so the two modes must
agree; the API mode also computes the direct result and records the largest difference
(``crosscheck``), which the report prints.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from registry.client import Job, RegistryClient
from registry.weights.adapters import LoraAdapter, load_peft_adapter
from registry.weights.compat import classification_compat
from registry.weights.merge import merge_adapters
from registry.weights.rmm import RmmBasis, fit_basis, load_basis
from registry.weights.transfer import transfer

from .models import State, load_checkpoint


@dataclass
class Pushed:
    """A local artifact and its registry ref (``direct:<name>`` without a server)."""

    ref: str
    path: Path


@dataclass
class BasisRequest:
    label: str
    p: int | None = None
    max_error: float | None = None


@dataclass
class MergeRequest:
    label: str
    method: str
    params: dict[str, Any]


@dataclass
class Crosscheck:
    """Largest differences between the API's results and the direct library calls."""

    values: dict[str, float] = field(default_factory=dict)

    def note(self, key: str, value: float) -> None:
        self.values[key] = max(self.values.get(key, 0.0), float(value))


def _max_factor_diff(a: LoraAdapter, b: LoraAdapter) -> float:
    return max(max(float((ma.A - b.modules[n].A).abs().max()), float((ma.B - b.modules[n].B).abs().max()))
               for n, ma in a.modules.items())


class DirectBackend:
    """``registry.weights`` called in-process (no server)."""

    mode = "direct"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.check = Crosscheck()

    def __enter__(self) -> DirectBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def push(self, folder: Path, name: str, *, kind: str, base: Pushed | None = None,
             tags: dict[str, str] | None = None) -> Pushed:
        return Pushed(f"direct:{name}", folder)

    def adapter(self, pushed: Pushed) -> LoraAdapter:
        return load_peft_adapter(pushed.path)

    def bases(self, members: Sequence[Pushed], adapters: Sequence[LoraAdapter], requests: Sequence[BasisRequest],
              name: str) -> dict[str, tuple[RmmBasis, str]]:
        out = {}
        for rq in requests:
            out[rq.label] = (fit_basis(adapters, p=rq.p, max_error=rq.max_error, names=[m.ref for m in members]),
                             "direct")
        return out

    def merges(self, members: Sequence[Pushed], adapters: Sequence[LoraAdapter], requests: Sequence[MergeRequest],
               rank: int, name: str) -> dict[str, tuple[LoraAdapter, str]]:
        out = {}
        for rq in requests:
            merged = merge_adapters(rq.method, adapters, rq.params, rank=rank)
            assert isinstance(merged, LoraAdapter)
            out[rq.label] = (merged, "direct")
        return out

    def transfer_finetune(self, finetune: Pushed, source: Pushed, target: Pushed) -> tuple[State, str, dict[str, Any]]:
        out = self.work / "transfers" / f"{finetune.path.name}-to-{target.path.name}"
        rep = transfer(finetune.path, source.path, target.path, out)
        return load_checkpoint(out), "direct", rep.as_dict()

    def transfer_adapter(self, adapter: Pushed, target: Pushed) -> tuple[LoraAdapter, str]:
        return load_peft_adapter(adapter.path), "direct"

    def compat(self, old: tuple[str, list[int]], new: tuple[str, list[int]], labels: list[int],
               dataset: str) -> dict[str, Any]:
        return classification_compat(old[1], new[1], labels).as_dict()

    def store_predictions(self, ref: str, dataset: str, predictions: list[int], labels: list[int]) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiBackend(DirectBackend):
    """A registry server started for the run; every artifact goes through its HTTP API."""

    mode = "api"

    def __init__(self, work: Path, poll: float = 0.1) -> None:
        super().__init__(work)
        self.home = Path(tempfile.mkdtemp(prefix="registry-home-", dir=work))
        self.poll = poll
        self.proc: subprocess.Popen[bytes] | None = None
        self.rc: RegistryClient | None = None
        self.jobs: list[Job] = []
        self.stored: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ server

    def __enter__(self) -> ApiBackend:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env.update(REGISTRY_HOME=str(self.home), REGISTRY_PORT=str(port), REGISTRY_HOST="127.0.0.1",
                   REGISTRY_MLFLOW_UI="false", PYTHONUNBUFFERED="1")
        self.log = self.home / "server.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "registry", "up"], env=env, stdout=logf,
                                         stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry up exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"registry did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)
        self.url = url
        self.rc = RegistryClient(url, token="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rc is not None:
            self.rc.close()
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT, not SIGTERM: uvicorn re-raises a captured SIGTERM after its own shutdown, which
            # ends `registry up` before it stops its worker and dispatcher children.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def client(self) -> RegistryClient:
        assert self.rc is not None, "use the backend as a context manager"
        return self.rc

    def _wait(self, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        done = [self.client.wait_job(j.id, poll=self.poll, timeout=600) for j in jobs]
        self.jobs.extend(done)
        return done

    def _pull(self, ref: str) -> Path:
        dest = self.work / "pulled" / ref.replace("@", "_v")
        self.client.pull(ref, dest)
        return dest

    # ------------------------------------------------------------------ artifacts

    def push(self, folder: Path, name: str, *, kind: str, base: Pushed | None = None,
             tags: dict[str, str] | None = None) -> Pushed:
        v = self.client.push(folder, name=name, kind=kind, base=base.ref if base else None, tags=tags)
        return Pushed(v.ref, folder)

    def adapter(self, pushed: Pushed) -> LoraAdapter:
        """The adapter as the registry serves it (pulled, then loaded); checked against the local folder."""
        pulled = load_peft_adapter(self._pull(pushed.ref))
        local = load_peft_adapter(pushed.path)
        self.check.note("adapter pull vs local (max |factor diff|)", _max_factor_diff(pulled, local))
        return pulled

    def bases(self, members: Sequence[Pushed], adapters: Sequence[LoraAdapter], requests: Sequence[BasisRequest],
              name: str) -> dict[str, tuple[RmmBasis, str]]:
        refs = [m.ref for m in members]
        jobs = [self.client.create_basis(refs, p=rq.p, max_error=rq.max_error, name=name) for rq in requests]
        out = {}
        for rq, job in zip(requests, self._wait(jobs), strict=True):
            ref = job.result["ref"]
            if job.result.get("deduplicated"):
                ref += " (deduplicated: same bytes as an earlier basis)"
            basis = load_basis(self._pull(job.result["ref"]) / "basis.safetensors")
            direct = fit_basis(adapters, p=rq.p, max_error=rq.max_error, names=refs)
            self.check.note("RMM basis: member delta error, API vs direct", max(
                abs(a.overall - b.overall) for a, b in zip(basis.member_errors(), direct.member_errors(), strict=True)))
            self.check.note("RMM basis: reconstructed factors, API vs direct", max(
                _max_factor_diff(basis.reconstruct(i), direct.reconstruct(i)) for i in range(len(refs))))
            out[rq.label] = (basis, ref)
        return out

    def merges(self, members: Sequence[Pushed], adapters: Sequence[LoraAdapter], requests: Sequence[MergeRequest],
               rank: int, name: str) -> dict[str, tuple[LoraAdapter, str]]:
        refs = [m.ref for m in members]
        jobs = [self.client.merge(rq.method, refs, name=f"{name}-{rq.label}", params=rq.params, rank=rank)
                for rq in requests]
        out = {}
        for rq, job in zip(requests, self._wait(jobs), strict=True):
            ref = job.result["ref"]
            merged = load_peft_adapter(self._pull(ref))
            direct = merge_adapters(rq.method, adapters, rq.params, rank=rank)
            assert isinstance(direct, LoraAdapter)
            self.check.note("merge: delta, API vs direct (max |ΔW diff|)", max(
                float((merged.delta(n) - direct.delta(n)).abs().max()) for n in merged.module_names()))
            out[rq.label] = (merged, ref)
        return out

    def transfer_finetune(self, finetune: Pushed, source: Pushed, target: Pushed) -> tuple[State, str, dict[str, Any]]:
        job = self._wait([self.client.transfer(finetune.ref, target.ref)])[0]
        ref = job.result["ref"]
        state = load_checkpoint(self._pull(ref))
        direct, _, rep = super().transfer_finetune(finetune, source, target)
        self.check.note("transfer: v2 + Δ tensors, API vs direct (max |diff|)",
                        max(float((state[k] - direct[k]).abs().max()) for k in direct))
        diag = dict(job.result.get("diagnostics") or {})
        return state, ref, diag or rep

    def transfer_adapter(self, adapter: Pushed, target: Pushed) -> tuple[LoraAdapter, str]:
        job = self._wait([self.client.transfer(adapter.ref, target.ref)])[0]
        ref = job.result["ref"]
        return load_peft_adapter(self._pull(ref)), ref

    def store_predictions(self, ref: str, dataset: str, predictions: list[int], labels: list[int]) -> None:
        if (ref, dataset) not in self.stored:
            self.client.store_predictions(ref, dataset, predictions=predictions, labels=labels)
            self.stored.add((ref, dataset))

    def compat(self, old: tuple[str, list[int]], new: tuple[str, list[int]], labels: list[int],
               dataset: str) -> dict[str, Any]:
        self.store_predictions(old[0], dataset, old[1], labels)
        self.store_predictions(new[0], dataset, new[1], labels)
        api = self.client.compat(old[0], new[0], dataset)
        local = classification_compat(old[1], new[1], labels).as_dict()
        self.check.note("MUSCLE: rc.compat vs registry.weights.compat (max |diff| over NFR, PFR, NFR_mc)",
                        max(abs(float(api.metrics[k]) - float(local[k])) for k in ("nfr", "pfr", "nfr_mc")))
        return local | {"api": api.model_dump(mode="json")}

    def job_seconds(self) -> dict[str, tuple[int, float]]:
        """Per job type: (jobs, summed worker seconds from the jobs' own started/finished stamps)."""
        out: dict[str, tuple[int, float]] = {}
        for j in self.jobs:
            if j.started_at and j.finished_at:
                n, sec = out.get(j.type, (0, 0.0))
                out[j.type] = (n + 1, sec + (j.finished_at - j.started_at).total_seconds())
        return out


def as_int_list(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.tolist()]
