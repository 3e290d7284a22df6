"""`gcsurgery demo` in --quick mode: the table grows epoch by epoch, the summary and the plot are written."""

import argparse
import json

import pytest
import torch

from gcsurgery import demo
from gcsurgery.errors import GCSurgeryError


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


def test_quick_demo_prints_its_table_and_writes_the_plot(tmp_path, capsys):
    assert demo.run(parse("--quick", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines.index("epoch | val acc baseline | val acc GCGD | step time GCGD/baseline")
    rows = [line.split("|") for line in lines[header + 2 : header + 4]]
    assert [int(r[0]) for r in rows] == [1, 2] and all(r[3].strip().endswith("x") for r in rows)
    assert "embedded subset" in out and "final val acc: baseline" in out
    assert "reached the baseline's final val acc" in out or "not reached" in out
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "demo.json").read_text())
    assert [len(result["history"][arm]) for arm in ("baseline", "gcgd")] == [2, 2]
    assert set(result["test_acc"]) == {"baseline", "gcgd"} and result["wall_time"] > 0


def test_bad_train_size(tmp_path):
    with pytest.raises(GCSurgeryError, match="--train-size must be in 1..5400"):
        demo.run(parse("--train-size", "0", "--out", str(tmp_path)))
