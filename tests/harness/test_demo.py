"""`gcsurgery demo`: the verdict logic on fixed inputs, and a --quick run (table, verdict, plot, JSON)."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from gcsurgery.errors import GCSurgeryError
from gcsurgery.harness import demo

DOCS_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches run faster on one thread (and far faster than two threads on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults():
    args = parse()
    assert (args.epochs, args.depth, args.quick, args.full, args.data_dir) == (None, 20, False, False, None)
    assert args.out == "gcsurgery-demo"


def test_shipped_reference_is_the_committed_benchmark_result():
    ref = demo.reference()
    committed = json.loads((DOCS_RESULTS.parent.parent / ref["source"]).read_text())
    assert ref["final_val_diff"] == committed["arms"]["gcgd"]["final_val_diff"]
    assert ref["test_diff"] == committed["arms"]["gcgd"]["test_diff"]
    assert ref["step_time_ratio"] == committed["arms"]["gcgd"]["step_time_ratio"]
    assert ref["seeds"] == committed["seeds"] and len(ref["seeds"]) >= 5
    assert (ref["train_size"], ref["val_size"], ref["epochs"]) == tuple(
        committed["config"][k] for k in ("train_size", "val_size", "epochs")
    )


def test_noise_is_the_larger_of_seed_spread_and_sampling():
    assert demo.noise_sd(seed_sd=0.0107, acc=0.85, n_val=600) == pytest.approx((2 * 0.85 * 0.15 / 600) ** 0.5)
    assert demo.noise_sd(seed_sd=0.0107, acc=0.85, n_val=100_000) == 0.0107


def test_the_issue_s_one_seed_gain_reads_as_within_noise():
    ref = demo.reference()
    lines = demo.verdict_lines(base=0.8317, gcgd=0.8483, n_val=600, ref=ref)  # the +1.67 points of one seed
    assert lines[0].startswith("final val acc: baseline 83.17%, GCGD 84.83% (+1.66 points; one seed, 600")
    assert lines[1].startswith("noise of one paired difference: ±4.23 points (2 sd; sd 2.12")
    assert lines[2].startswith("verdict: within noise.") and "'Does it pay?'" in lines[2]
    assert "5 paired seeds (10000 training / 5000 validation images, 5 epochs)" in lines[2]
    assert "+0.41 ± 1.07 val points" in lines[2] and ref["source"] in lines[2]
    assert not any("wall time" in line for line in lines)


def test_a_gap_beyond_the_noise_is_called_so():
    ref = demo.reference()
    ahead = demo.verdict_lines(base=0.85, gcgd=0.90, n_val=5000, ref=ref)
    behind = demo.verdict_lines(base=0.90, gcgd=0.85, n_val=5000, ref=ref)
    assert ahead[2].startswith("verdict: GCGD ahead.") and behind[2].startswith("verdict: GCGD behind.")


def test_quick_demo_prints_its_table_verdict_and_plot(tmp_path, capsys):
    assert demo.run(parse("--quick", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines.index("epoch | val acc baseline | val acc GCGD | CPU time per step GCGD/baseline")
    rows = [line.split("|") for line in lines[header + 2 : header + 4]]
    assert [int(r[0]) for r in rows] == [1, 2] and all(r[3].strip().endswith("x") for r in rows)
    assert "embedded subset" in out and "final val acc: baseline" in out
    assert any(line.startswith("verdict: ") for line in lines)
    assert "per-process CPU time" in out and "wall time to" not in out
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "demo.json").read_text())
    assert [len(result["history"][arm]) for arm in ("baseline", "gcgd")] == [2, 2]
    assert set(result["test_acc"]) == {"baseline", "gcgd"} and result["wall_time"] > 0
    assert len(result["cpu_step_time_ratio"]["per_epoch"]) == 2 and result["noise_sd"] > 0


def test_bad_train_size(tmp_path):
    with pytest.raises(GCSurgeryError, match="--train-size must be in 10..5400"):
        demo.run(parse("--train-size", "0", "--out", str(tmp_path)))
