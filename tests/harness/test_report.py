"""Reports: statistics, the paired verdict, tables and plots."""

import pytest

from gcsurgery.harness.report import (
    crossing,
    markdown_table,
    mean_std,
    paired_interval,
    paired_verdict,
    plot_curves,
    spread,
)


def test_crossing_interpolates_between_epochs():
    accs, times = [0.1, 0.5, 0.7, 0.8], [0.0, 10.0, 20.0, 30.0]
    assert crossing(accs, times, 0.6) == pytest.approx((1.5, 15.0))
    assert crossing(accs, times, 0.5) == (1.0, 10.0)
    assert crossing(accs, times, 0.05) == (0.0, 0.0)
    assert crossing(accs, times, 0.9) == (None, None)


def test_mean_std_and_spread():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    s = spread(list(range(11)))
    assert (s["median"], s["p10"], s["p90"]) == (5.0, 1.0, 9.0)


def test_paired_verdict_on_fixed_inputs():
    # five seeds of the README's benchmark: GCGD +0.41 ± 1.07 points, within noise
    v = paired_verdict([0.0138, -0.0088, 0.0012, 0.0162, -0.0020])
    assert v["verdict"] == "within noise" and v["sd_from"] == "these seeds" and v["n"] == 5
    assert paired_verdict([0.02, 0.021, 0.019])["verdict"] == "ahead"
    assert paired_verdict([-0.02, -0.021, -0.019])["verdict"] == "behind"
    one = paired_verdict([0.0166], seed_sd=0.0107)  # one seed: the spread must come from elsewhere
    assert one["sd_from"] == "given" and one["half_width"] == pytest.approx(0.0214) and one["verdict"] == "within noise"
    assert paired_verdict([0.0166])["verdict"] == "unknown"


def test_markdown_table_and_plot(tmp_path):
    assert markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    plot_curves({"x": [0.5, 0.6]}, tmp_path / "a.png", bands={"x": [0.01, 0.02]}, first_epoch=1)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_interval_is_students_t_and_gives_a_verdict():
    v = paired_interval([0.01, 0.02, 0.03, 0.02, 0.02])
    half = 2.7764451051977987 * 0.007071067811865475 / 5**0.5  # t(0.975, 4) · sd / √n
    assert v["mean"] == pytest.approx(0.02) and v["high"] - v["mean"] == pytest.approx(half)
    assert v["verdict"] == "pays" and paired_interval([-0.02, -0.021, -0.019])["verdict"] == "hurts"
    assert paired_interval([0.01, -0.01, 0.02])["verdict"] == "within noise"
    assert paired_interval([0.01])["verdict"] == "unknown"
