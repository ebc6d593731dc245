"""MLflow provenance store: several processes initialising a fresh embedded SQLite store at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
from pathlib import Path
from registry.config import Settings
from registry.provenance import Provenance

home, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
p = Provenance(Settings(home=home))
with p.run("m", "race", {"i": sys.argv[3]}) as run:
    run.log_metrics({"x": 1.0})
print(run.run_id)
"""


def test_concurrent_first_use_of_the_sqlite_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    start = time.time() + 8  # after every process has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(home), str(start), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, errs) in zip(procs, outs, strict=True):
        assert p.returncode == 0, errs[-3000:]
        assert len(out.strip()) == 32
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(home / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("registry/m").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
