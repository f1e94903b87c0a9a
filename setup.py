"""Build hooks beside ``pyproject.toml`` (which holds all the metadata).

An installed package has no ``.git``, so ``results.json`` could not say which commit made
it. At build time this writes ``evals/_build_info.py`` (``COMMIT = "<git describe>"``) into
the built package: ``pip install .`` builds the wheel in this checkout, where ``git``
answers. A wheel built from an sdist gets the file the sdist carries (written the same way
when the sdist was made). The source tree itself is never touched, and a checkout (or an
editable install) asks ``git`` at run time instead (``evals.report._commit``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
INFO = Path("evals") / "_build_info.py"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, check=True, cwd=HERE,
                              timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_info(root: Path) -> None:
    commit = _commit()
    if commit is None:  # no git here (a build from an sdist): keep the file it carries
        if not (root / INFO).exists() and (HERE / INFO).exists():
            (root / INFO).write_text((HERE / INFO).read_text())
        return
    (root / INFO).parent.mkdir(parents=True, exist_ok=True)
    (root / INFO).write_text(f'"""Written by setup.py at build time."""\n\nCOMMIT = {commit!r}\n')


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install runs from the checkout: git answers
            _write_info(Path(self.build_lib))


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _write_info(Path(base_dir))


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
