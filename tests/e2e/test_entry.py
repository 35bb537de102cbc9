"""The entry point reports config problems in one line (exit status 2) and bad prompt files in one line
(exit status 1), never a traceback."""
import os
import re

import pytest

from ng_jax.main import main


def _run(capsys, *args):
    code = main(["ng_jax.main", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("args, expected", [
    (["--config=ng_jax/configs/does_not_exist.py"], "config file not found: ng_jax/configs/does_not_exist.py"),
    (["--config=ng_jax/configs/awm.py", "--config.rl.no_such_knob=3"], "unknown config key"),
    (["--config=ng_jax/configs/awm.py", "--config.rl.epochs=many"], "bad value"),
    (["--config=ng_jax/configs/awm.py", "--config.rl.method=ppo"], "rl.method='ppo': expected one of nft, awm, dpo"),
    (["--config=ng_jax/configs/awm.py", "--config.normguard.power=3"], "normguard.power=3: expected 1 or 2"),
    (["--config=ng_jax/configs/awm.py", "--config.normguard.lam=-1.0"], "normguard.lam=-1.0"),
    (["--config=ng_jax/configs/awm.py", "--no_such_flag=1"], "unknown flag"),
    ([], "missing --config"),
])
def test_config_errors_are_one_line(capsys, args, expected):
    code, err = _run(capsys, *args)
    assert code == 2
    assert expected in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_overrides_reach_the_config():
    from ng_jax.main import parse_args

    config, workdir, distributed = parse_args(
        ["x", "--config=ng_jax/configs/nft_normguard.py", "--config.rl.epochs=3", "--config.normguard.margin=0.02",
         "--workdir=/tmp/somewhere"])
    assert config.rl.epochs == 3 and config.normguard.margin == 0.02
    assert workdir == "/tmp/somewhere" and distributed is False


def test_normguard_variants_differ_only_in_normguard_block():
    from ng_jax.main import parse_args

    for method in ("nft", "awm", "dpo"):
        base, _, _ = parse_args(["x", f"--config=ng_jax/configs/{method}.py"])
        ng, _, _ = parse_args(["x", f"--config=ng_jax/configs/{method}_normguard.py"])
        b, g = base.to_dict(), ng.to_dict()
        differing = {k for k in set(b) | set(g) if b.get(k) != g.get(k)}
        assert differing == {"normguard", "name", "workdir"}, differing
        assert g["normguard"]["lam"] > 0 and b["normguard"]["lam"] == 0


@pytest.mark.parametrize("name", ["nft", "awm", "dpo", "nft_normguard", "awm_normguard", "dpo_normguard"])
def test_toy_rl_configs_pass_the_batch_checks(name):
    """Every shipped toy RL config must start: its batch arithmetic is checked before any compile
    (the DPO config once asked for 32 pairs per step from 8 prompts)."""
    from ng_jax.eval import grid
    from ng_jax.rl.loop import check_rl_config

    check_rl_config(grid.load_config_file(f"{name}.py"), 1)


@pytest.mark.parametrize("content, message", [
    (None, r"data.prompt_file='.*missing.txt': prompt file '.*missing.txt' does not exist"),
    ("# only a comment\n\n", r"holds no prompts"),
    ("a red circle\na purple elephant\n", r"bad.txt:2"),
])
def test_bad_prompt_file_is_one_line_exit_1(tmp_path, capsys, content, message):
    path = tmp_path / ("missing.txt" if content is None else "bad.txt")
    if content is not None:
        path.write_text(content)
    code = main(["ng_jax.main", "--config=ng_jax/configs/awm.py", f"--workdir={tmp_path / 'wd'}",
                 f"--config.data.prompt_file={path}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")
