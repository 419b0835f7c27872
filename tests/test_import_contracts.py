"""The import direction in STYLE.md, checked two ways: import-linter's static contracts, and
a fresh interpreter that imports the serving packages and must not load the export stack."""

import subprocess
import sys

from tests.support.procs import REPO

HEAVY = ("torch", "transformers", "optimum", "exporters", "accelerate", "gguf")


def test_import_linter_contracts_hold():
    lint = str(__import__("pathlib").Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_serving_packages_do_not_load_the_export_stack():
    code = (
        "import sys, pkgutil, importlib\n"
        "import edge_agent, cloud_router\n"
        "for pkg in (edge_agent, cloud_router):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"serving imports pulled in: {r.stdout}"
