"""Install bench (issue "Fits the tools people already use", part 5): what each Makefile
install costs on a fresh clone.

    python bench/install.py [--only demo|test]

Clones this checkout's HEAD into a temporary folder and runs `make install-demo` (what
`make demo` installs) and `make install` (what `make test` installs), each in its own fresh
clone, timing it and measuring the venv: size on disk and the number of packages. The pip
cache of the machine is used as a user's would be (the figures say whether it was warm:
a second run on the same machine is). Writes bench/results/install.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write  # noqa: E402

TARGETS = {"demo": "install-demo", "test": "install"}


def _size_mb(folder: Path) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return round(total / 2**20, 1)


def measure(kind: str, scratch: Path) -> dict[str, Any]:
    clone = scratch / kind
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["make", TARGETS[kind]], cwd=clone, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"make {TARGETS[kind]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    venv = clone / ".venv"
    packages = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True,
                              text=True, check=True).stdout.split()
    return {"target": f"make {TARGETS[kind]}", "seconds": round(seconds, 1), "venv_mb": _size_mb(venv),
            "packages": len(packages), "triton": any(p.startswith("triton==") for p in packages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(TARGETS), help="measure one install (default: both)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-install-"))
    figures: dict[str, Any] = {"pip_cache": "the machine's (warm after any earlier install)"}
    try:
        for kind in [args.only] if args.only else list(TARGETS):
            figures[kind] = measure(kind, scratch)
            print(kind, figures[kind])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures["goal_demo_under_3_min"] = figures.get("demo", {}).get("seconds", 1e9) < 180
    print("wrote", write("install", figures))


if __name__ == "__main__":
    main()
