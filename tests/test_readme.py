"""Every Python block of the README runs on its own, and its shell commands run as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
CRITEO = ROOT.parent / "shared" / "data" / "criteo-sample"


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON_BLOCKS) >= 3 and len(BASH_BLOCKS) >= 3


def test_no_text_file_holds_merge_conflict_markers():
    """A merge once left its markers in the README: every documentation and source file of the
    repository is checked for them."""
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", flags=re.M)
    paths = [p for pattern in ("*.md", "recis/**/*.py", "tests/*.py", "benchmarks/*.py",
                               "docs/**/*.md", ".ci/*")
             for p in ROOT.glob(pattern) if p.is_file()]
    assert len(paths) > 20
    dirty = [str(p.relative_to(ROOT)) for p in paths if marker.search(p.read_text())]
    assert not dirty, f"merge conflict markers in {dirty}"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_each_python_block_runs_alone(index, tmp_path):
    script = tmp_path / f"block{index}.py"
    script.write_text(PYTHON_BLOCKS[index])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"README python block {index}:\n{done.stderr[-3000:]}"


def _commands(module: str) -> list[list[str]]:
    """The README's shell commands that run ``module``, continuation lines joined."""
    out = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if f"-m {module}" in line and line.startswith("python"):
                out.append(shlex.split(line))
    return out


@pytest.mark.skipif(not CRITEO.is_dir(), reason="../shared/data/criteo-sample is absent")
def test_the_criteo_command_runs_as_written_from_the_repository_root(tmp_path):
    import glob

    commands = [c for c in _commands("recis.examples.deepfm") if "--data" in c]
    assert commands, "the README gives no command on files"
    for i, cmd in enumerate(commands):
        args = []
        for word in cmd[1:]:  # the shell expands the patterns; do the same
            matches = sorted(glob.glob(str(ROOT / word))) if "[" in word else []
            args += [os.path.relpath(m, ROOT) for m in matches] or [word]
        args += ["--steps", "3", "--no-progress", "--output", str(tmp_path / f"out{i}")]
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr[-2000:]}"
