"""The browser assets the web UI and the API docs serve, vendored from npm into ``static/vendor``.

The npm packages are pinned in ``package.json`` and ``package-lock.json`` beside this file;
``python -m registry.ui.vendor`` (needs npm) installs exactly the locked versions into a scratch
directory (``npm ci --ignore-scripts``) and copies the files :data:`ASSETS` names, with their
licences, into ``static/vendor``, recording each file's package, version and sha256 in
``static/vendor/VERSIONS.json``. The copies are committed: installing the package needs no npm and
serving it needs no network (``tests/test_ui_http.py`` checks the copies against the lock file).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "static" / "vendor"
VERSIONS = VENDOR / "VERSIONS.json"

ASSETS: dict[str, tuple[str, str]] = {
    # file under static/vendor: (npm package, path inside it)
    "htmx.min.js": ("htmx.org", "dist/htmx.min.js"),
    "cytoscape.min.js": ("cytoscape", "dist/cytoscape.min.js"),
    # cytoscape's dagre layout; the build bundles @dagrejs/dagre itself
    "cytoscape-dagre.min.js": ("cytoscape-dagre", "dist/cytoscape-dagre.min.js"),
    "swagger-ui-bundle.js": ("swagger-ui-dist", "swagger-ui-bundle.js"),
    "swagger-ui.css": ("swagger-ui-dist", "swagger-ui.css"),
    "favicon-32x32.png": ("swagger-ui-dist", "favicon-32x32.png"),
    "redoc.standalone.js": ("redoc", "bundles/redoc.standalone.js"),
}
LICENSES: dict[str, str] = {
    # npm package: its licence file, copied as LICENSE.<package>
    "htmx.org": "LICENSE", "cytoscape": "LICENSE", "cytoscape-dagre": "LICENSE",
    "swagger-ui-dist": "LICENSE", "redoc": "LICENSE",
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locked_versions(lock: Path = HERE / "package-lock.json") -> dict[str, str]:
    """npm package -> the version ``package-lock.json`` pins, for the packages :data:`ASSETS` uses."""
    packages = json.loads(lock.read_text())["packages"]
    return {pkg: packages[f"node_modules/{pkg}"]["version"] for pkg, _ in ASSETS.values()}


def vendor() -> dict[str, dict[str, str]]:
    """Install the locked packages into a scratch directory and copy the assets out of it."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, work / name)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work, check=True)
        modules = work / "node_modules"
        VENDOR.mkdir(parents=True, exist_ok=True)
        record: dict[str, dict[str, str]] = {}
        for dest, (pkg, inner) in sorted(ASSETS.items()):
            version = json.loads((modules / pkg / "package.json").read_text())["version"]
            shutil.copy(modules / pkg / inner, VENDOR / dest)
            record[dest] = {"package": pkg, "version": version, "path": inner, "sha256": sha256_of(VENDOR / dest)}
        for pkg, licence in LICENSES.items():
            shutil.copy(modules / pkg / licence, VENDOR / f"LICENSE.{pkg}")
    VERSIONS.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


if __name__ == "__main__":
    for dest, info in vendor().items():
        print(f"{dest:28} {info['package']}@{info['version']}", file=sys.stderr)
