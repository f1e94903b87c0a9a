"""README's demo figures are bench/results/demo.json, not a hand-copied table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.demo import table  # noqa: E402


def test_readme_claims_table_is_the_recorded_one():
    doc = json.loads((REPO / "bench" / "results" / "demo.json").read_text())["figures"]
    expected = table(doc)
    assert len(doc["seeds"]) >= 2, "a verdict needs two training seeds"
    assert expected in (REPO / "README.md").read_text(), (
        "README's claims table differs from bench/results/demo.json: paste `python bench/demo.py --table`")
