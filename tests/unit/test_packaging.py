"""What a non-editable install gets: the wheel holds the package, its shipped weights and the job configs,
and `--config=NAME` finds a shipped config from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from ng_jax.config.methods import CONFIG_DIR
from ng_jax.main import parse_args, resolve_config
from tests.fixtures import REPO


def test_shipped_configs_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here
    want = os.path.join(CONFIG_DIR, "awm_normguard.py")
    for given in ("ng_jax/configs/awm_normguard.py", "configs/awm_normguard.py", "awm_normguard.py", "awm_normguard"):
        assert resolve_config(f"--config={given}") == f"--config={want}"
    assert resolve_config("--config=experiments/pilot.py:soft_free") == (
        f"--config={os.path.join(CONFIG_DIR, 'experiments', 'pilot.py')}:soft_free")
    assert resolve_config("--config=nothing_like_it.py") == "--config=nothing_like_it.py"
    config, _, _ = parse_args(["ng_jax.main", "--config=awm_normguard", "--config.rl.epochs=3"])
    assert config.job == "rl" and config.rl.epochs == 3 and config.normguard.lam > 0


@pytest.mark.slow
def test_the_wheel_ships_configs_and_weights(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    shutil.copytree(os.path.join(REPO, "ng_jax"), src / "ng_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for path in ("ng_jax/configs/awm_normguard.py", "ng_jax/configs/experiments/toy_grid.py",
                 "ng_jax/assets/reference/params.msgpack", "ng_jax/assets/preference.msgpack", "ng_jax/main.py"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "configs/", "ng_jax/assets/reference_stage")) for n in names)
