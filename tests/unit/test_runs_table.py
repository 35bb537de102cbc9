"""The runs table reads what a run's summary.json records, with hand-made summaries."""

import json

from ng_jax.eval.runs_table import fd_floor, high_sigma_ratio, run_row, table


def _summary(tmp_path, name, ratios, guided_ratios, wall_s=600.0):
    def ev(r, kid, fd, extra=None):
        out = {"reward": r, "norm_ratio_by_sigma": ratios, "kid": kid, "kid_ci_low": kid - 1, "kid_ci_high": kid + 1,
               "fd": fd, "saturation_diff": 0.01, "out_of_range": 0.002, "n_images": 384}
        return {**out, **(extra or {})}
    g0 = {"fd": 80.0, "norm_ratio_by_sigma": [[0.9, 1.0]]}
    g1 = {"fd": 90.0, "norm_ratio_by_sigma": guided_ratios}
    s = {"eval_initial": ev(1.0, 0.5, 30.0, {"variants": {"guided": g0}}),
         "eval": ev(2.0, 40.0, 50.0, {"variants": {"guided": g1}}), "wall_s": wall_s}
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(s))
    return str(d)


def test_high_sigma_ratio_averages_only_the_steps_at_or_above_the_threshold():
    r = {"norm_ratio_by_sigma": [[1.0, 1.10], [0.75, 1.06], [0.5, 1.02], [0.25, 0.90], [0.0, 0.5]]}
    assert abs(high_sigma_ratio(r, 0.5) - (1.10 + 1.06 + 1.02) / 3) < 1e-12
    assert high_sigma_ratio(r, 1.5) is None and high_sigma_ratio({}, 0.5) is None


def test_fd_floor_only_at_a_measured_n():
    floors = {"floors": [{"n": 96, "fd_mean": 20.9}, {"n": 384, "fd_mean": 5.8}]}
    assert fd_floor(floors, 384) == 5.8 and fd_floor(floors, 200) is None and fd_floor(None, 96) is None


def test_a_row_holds_the_run_s_numbers(tmp_path):
    w = _summary(tmp_path, "soft_free", [[0.9, 1.08], [0.6, 1.04], [0.3, 0.95]], [[0.9, 1.2], [0.1, 1.0]])
    row = run_row(w, {"floors": [{"n": 384, "fd_mean": 5.8}]}, 0.5)
    assert row[0] == "soft_free" and row[1] == "1.000 -> 2.000"
    assert row[2] == "1.0600" and row[3] == "1.2000"
    assert row[4] == "0.5 -> 40.0 [39.0, 41.0]" and row[5] == "30.0 -> 50.0 (floor 5.8)"
    assert row[8] == "80.0 -> 90.0" and row[9] == "10"
    assert "not finished" in table([w, str(tmp_path / "missing")], None, 0.5)
