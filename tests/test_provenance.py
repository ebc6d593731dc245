"""MLflow provenance store: several processes initialising a fresh SQLite store at once (sharing
one REGISTRY_HOME, or each with its own home and one REGISTRY_MLFLOW_TRACKING_URI file)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import sys, time
from pathlib import Path
from registry.config import Settings
from registry.provenance import Provenance

home, start, uri = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[4] or None
while time.time() < start:
    time.sleep(0.001)
p = Provenance(Settings(home=home, mlflow_tracking_uri=uri))
with p.run("m", "race", {"i": sys.argv[3]}) as run:
    run.log_metrics({"x": 1.0})
print(run.run_id)
"""


@pytest.mark.parametrize("homes", ["one home", "own homes"])
def test_concurrent_first_use_of_the_sqlite_store(tmp_path: Path, homes: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{(home / 'mlflow.db').resolve()}"
    start = time.time() + 8  # after every process has imported mlflow
    procs = []
    for i in range(4):
        own = tmp_path / f"home-{i}" if homes == "own homes" else home
        own.mkdir(exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(own), str(start), str(i),
                                       uri if homes == "own homes" else ""],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, errs) in zip(procs, outs, strict=True):
        assert p.returncode == 0, errs[-3000:]
        assert len(out.strip()) == 32
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("registry/m").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


def test_a_failed_job_run_says_why(tmp_path: Path) -> None:
    """A job that fails in the worker leaves its MLflow run FAILED with the error's text."""
    import pytest

    from registry.config import Settings
    from registry.errors import InvalidInput
    from registry.provenance import Provenance

    prov = Provenance(Settings(home=tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    with pytest.raises(InvalidInput), prov.run("m", "merge (job 7)", {"method": "ties"}) as handle:
        raise InvalidInput("module q_proj: shapes differ", code="invalid_weights")
    run = prov.client.get_run(handle.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["registry.status"] == "failed"
    assert run.data.tags["registry.error"] == "InvalidInput: module q_proj: shapes differ"


def test_the_mlflow_mirror_follows_tags_aliases_and_storage_mode(tmp_path: Path) -> None:
    """Registry aliases become MLflow aliases, user tags are mirrored, and a refresh (after a
    prune, an alias moved away, a tag deleted) updates the same MLflow version."""
    from registry.config import Settings
    from registry.provenance import Provenance

    prov = Provenance(Settings(home=tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    view = {"model": "sql-lora", "ref": "sql-lora@1", "version": 1, "kind": "adapter", "status": "ready",
            "storage_mode": "stored", "parents": [], "base": "b@1", "content_sha256": "0" * 64,
            "tags": {"eval.sql": "0.83"}, "aliases": ["production", "bad.name"], "description": ""}
    name, number = prov.register_version(view)
    mv = prov.client.get_model_version(name, number)
    assert mv.tags["eval.sql"] == "0.83" and mv.tags["registry.storage_mode"] == "stored"
    aliases = {a: str(v) for a, v in prov.client.get_registered_model(name).aliases.items()}
    assert aliases == {"production": number}  # bad.name: MLflow refuses such names

    pruned = {**view, "storage_mode": "derived:basis", "tags": {}, "aliases": [],
              "parents": [{"relation": "basis_member_of", "ref": "b-rmm@1"}]}
    assert prov.register_version(pruned) == (name, number)
    mv = prov.client.get_model_version(name, number)
    assert mv.tags["registry.storage_mode"] == "derived:basis" and "eval.sql" not in mv.tags
    assert "basis_member_of:b-rmm@1" in mv.tags["registry.parents"]
    assert prov.client.get_registered_model(name).aliases == {}


def test_experiments_are_model_development(tmp_path: Path) -> None:
    """Runs land where a model-training user looks: the experiment is marked model development
    (an older experiment without the mark gets it on next use)."""
    from mlflow import MlflowClient

    from registry.config import Settings
    from registry.provenance import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Provenance

    settings = Settings(home=tmp_path)
    prov = Provenance(settings)
    client = MlflowClient(tracking_uri=settings.resolved_mlflow_uri)
    exp = client.get_experiment(prov.experiment_id("fresh"))
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("registry/older")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert prov.experiment_id("older") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
