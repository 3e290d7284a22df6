"""The benchmarks in their smallest modes: they run, and what they write has the expected keys and shapes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / script), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_smallest_run_writes_time_and_memory_ratios(tmp_path):
    out = tmp_path / "overhead.json"
    argv = ["--models", "cifar_resnet20", "--arms", "gcgd", "--batch", "2", "--rounds", "2", "--steps", "1"]
    run("overhead.py", *argv, "--warmup", "1", "--threads", "1", "--cpu-time", "--json", str(out))
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and res["device"] == "cpu" and res["rounds"] == 2 and res["memory"] == "all"
    assert res["clock"] == "thread_time"
    (case,) = res["cases"]
    assert case["model"] == "cifar_resnet20" and case["batch"] == 2 and case["input"] == [3, 32, 32]
    assert list(case["arms"]) == ["baseline", "gcgd"]  # the baseline is always measured
    base, gcgd = case["arms"]["baseline"], case["arms"]["gcgd"]
    assert base["time_ratio"] == {"median": 1.0, "p10": 1.0, "p90": 1.0}
    assert base["peak_ratio"] == base["saved_ratio"] == 1.0 and base["rss_ratio"] in (1.0, None)  # None: RSS +0
    assert len(gcgd["step_s"]) == 2 and all(len(r) == 1 for r in gcgd["step_s"])
    assert gcgd["step_ms"]["p10"] <= gcgd["step_ms"]["median"] <= gcgd["step_ms"]["p90"]
    assert gcgd["time_ratio"]["median"] > 0
    ci = gcgd["time_interval"]  # geometric mean over the 2 rounds, with its t interval
    assert ci["low"] <= ci["mean"] <= ci["high"] and base["time_interval"]["mean"] == 1.0
    assert gcgd["memory"]["peak_kind"] == "cpu_allocator_profiler" and gcgd["memory"]["rss_peak_reset"]
    assert isinstance(gcgd["rss_mb"], float) and "rss_ratio" in gcgd  # RSS may not grow at all on a tiny batch
    assert gcgd["peak_ratio"] > 1 and gcgd["saved_ratio"] > 1  # the GC-ODE branches and GC-W state take memory
    assert len(gcgd["sites"]) == 3 and base["sites"] == []
    printed = run("overhead.py", "--report", str(out)).stdout  # the saved run's table again, measuring nothing
    assert "main-thread CPU time" in printed and f"{ci['mean']:.3f}" in printed


def test_overhead_cpu_time_needs_one_cpu_thread():
    done = run("overhead.py", "--cpu-time", "--threads", "2", check=False)
    assert done.returncode != 0 and "--cpu-time times one CPU thread" in done.stderr and "--threads 2" in done.stderr


def test_branch_widths_times_each_branch_at_both_widths(tmp_path):
    out = tmp_path / "widths.json"
    run(
        "branch_widths.py",
        "--models",
        "cifar_resnet20",
        "--size",
        "32",
        "--batch",
        "2",
        "--rounds",
        "1",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())["models"]["cifar_resnet20"]
    assert [r["width"] for r in rows] == [8, 8, 16] == [r["uncapped_width"] for r in rows]  # Cb <= 64: no cap
    assert all(r["default_ms"] > 0 and r["uncapped_ms"] > 0 and r["floor_ms"] >= 0 for r in rows)


def test_time_to_accuracy_quick_writes_results_table_and_plot(tmp_path):
    done = run("time_to_accuracy.py", "--quick", "--out", str(tmp_path))
    assert "results.md" in done.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    arms = ["baseline", "gcw", "gcode", "gcgd", "lookahead"]
    assert res["arms_order"] == arms and res["seeds"] == [0] and res["config"]["epochs"] == 2
    for arm in arms:
        r = res["arms"][arm]
        assert len(r["val_curve"]["mean"]) == len(r["val_curve"]["std"]) == 3  # the untrained model, then 2 epochs
        assert 0 <= r["final_val_acc"]["mean"] <= 1 and r["final_val_acc"]["n"] == 1
        assert 0 <= r["test_acc"]["mean"] <= 1 and r["best_epoch"][0] in (0, 1, 2)
        assert r["step_time_ratio"]["p10"] <= r["step_time_ratio"]["median"] <= r["step_time_ratio"]["p90"]
    assert res["arms"]["baseline"]["final_val_diff"]["mean"] == 0.0
    assert set(res["levels"]) == {"0.5", "0.75", "0.9", "1"}
    assert all(set(lv["arms"]) == set(arms) for lv in res["levels"].values())
    final = res["levels"]["1"]
    assert final["target"] == pytest.approx(res["arms"]["baseline"]["final_val_acc"]["mean"])
    assert final["arms"]["baseline"]["epochs_ratio"] in (1.0, None)  # None: the untrained model is already there
    runs = json.loads((tmp_path / "runs" / "gcgd-seed0.json").read_text())
    assert [r["epoch"] for r in runs["history"]] == [0, 1, 2] and len(runs["gcw_sites"]) == 3
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{a}-seed0.json" for a in arms)
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in arms]
    assert len(rows) == 2 * len(arms)  # the main table and the levels table
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    refused = run("time_to_accuracy.py", "--quick", "--out", str(tmp_path), check=False)
    assert refused.returncode == 1 and "holds earlier runs; pass --resume" in refused.stderr
    resumed = run("time_to_accuracy.py", "--quick", "--out", str(tmp_path), "--resume")
    assert not any(line.startswith("seed 0 epoch") for line in resumed.stdout.splitlines())  # all runs skipped
    assert json.loads((tmp_path / "results.json").read_text())["arms"] == res["arms"]


def test_regimes_quick_runs_seeds_in_parallel_and_resumes(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--regimes", "resnet20", "--arms", "gcw", "sam", "--seeds", "0", "1"]
    done = run("regimes.py", *argv, "--jobs", "2")
    assert "done: resnet20 seed 0" in done.stdout and "done: resnet20 seed 1" in done.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    cells = res["regimes"]["resnet20"]["arms"]
    assert list(cells) == ["baseline", "gcw", "sam"]
    for c in cells.values():
        assert c["seeds"] == [0, 1] and 0 <= c["final_val_acc"]["mean"] <= 1 and len(c["curve"]) == 3
        assert c["val_diff"]["n"] == 2 and c["val_diff"]["verdict"] in ("pays", "hurts", "within noise")
        assert c["epochs_ratio"]["n"] == 2 and c["step_time_ratio"] > 0
    assert cells["baseline"]["val_diff"]["mean"] == 0.0 and cells["sam"]["step_time_ratio"] > 1  # two passes a step
    missing = {(m["regime"], m["arm"]): m["seeds"] for m in res["missing"]}
    assert missing[("resnet20", "gcw")] == missing[("resnet20", "sam")] == 2 and missing[("plain56", "gcgd")] == 0
    todo = {(m["regime"], m["arm"]): m for m in res["missing"]}  # unmeasured regimes: estimated by their FLOPs
    assert not todo[("resnet20", "gcw")]["estimated"] and todo[("plain56", "gcgd")]["estimated"]
    per_run = {r: todo[(r, "gcgd")]["per_run_s"] for r in ("resnet20", "plain20", "plain56", "full-data")}
    assert per_run["plain20"] == pytest.approx(per_run["resnet20"], rel=0.05)  # same convolutions, no shortcuts
    assert 2.5 < per_run["plain56"] / per_run["plain20"] < 3.3 and per_run["full-data"] > per_run["resnet20"]
    runs = sorted(p.name for p in (tmp_path / "runs" / "resnet20").iterdir())
    assert runs == sorted(f"{a}-seed{s}.json" for a in ("baseline", "gcw", "sam") for s in (0, 1))  # no checkpoints
    md = (tmp_path / "results.md").read_text()
    assert "## resnet20" in md and "| gcw | 2 |" in md and "## Missing cells" in md
    command = f"python benchmarks/regimes.py --jobs 2 --quick --out {tmp_path} --regimes resnet20"
    assert f"`{command} --arms baseline gcw sam --seeds 0 1`" in md  # the command that trains the cells
    for png in ("map.png", "curves-resnet20.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls = {json.loads(p.read_text())["call"] for p in (tmp_path / "runs" / "resnet20").iterdir()}
    assert len(calls) == 1  # one command trained them all, in turns: their times compare
    again = run("regimes.py", *argv)
    assert not any(line.startswith("seed ") for line in again.stdout.splitlines())  # every run was there
    assert json.loads((tmp_path / "results.json").read_text())["regimes"] == res["regimes"]
    later = ["--quick", "--out", str(tmp_path), "--regimes", "resnet20", "--arms", "gradcent", "gcw:peer=gradcent"]
    run("regimes.py", *later, "--seeds", "0")  # arms added by a later command: accuracy pairs, time does not
    regime = json.loads((tmp_path / "results.json").read_text())["regimes"]["resnet20"]
    added = regime["arms"]["gradcent"]
    assert added["seeds"] == [0] and added["step_time_ratio"] is None and added["wall_ratio"]["n"] == 0
    assert added["epochs_ratio"]["n"] == 1
    stacked = regime["stacked"]["gcw:peer=gradcent"]  # GC-W on the peer, paired with the peer alone
    assert stacked["vs"] == "gradcent" and stacked["seeds"] == [0] and stacked["val_diff"]["n"] == 1
    md = (tmp_path / "results.md").read_text()
    assert "On top of a peer" in md
    assert "--regimes resnet20 --arms baseline gcw sam --seeds 0 1`" in md  # one command per set of seeds
    assert "--regimes resnet20 --arms baseline gradcent gcw:peer=gradcent --seeds 0`" in md
    refused = run("regimes.py", "--quick", "--arms", "gcgd:ode.gate=1", "--out", str(tmp_path), check=False)
    assert refused.returncode == 1 and "cannot read 'ode.gate=1'" in refused.stderr


def test_regimes_cell_counts_the_runs_that_diverged():
    regimes = load("regimes.py")

    def summary(accs, losses):
        hist = [{"epoch": 0, "val_acc": 0.1, "train_time": 0.0, "cpu_time": 0.0}]
        hist += [{"epoch": e, "val_acc": a, "train_loss": loss, "train_time": 10.0 * e, "cpu_time": 10.0 * e,
                  "step_time": 0.1} for e, (a, loss) in enumerate(zip(accs, losses, strict=True), 1)]  # fmt: skip
        return {"final_val_acc": accs[-1], "test_acc": accs[-1], "history": hist, "train_time": 20.0, "call": "t"}

    nan = float("nan")
    results = {("baseline", s): summary([0.5, 0.6], [1.0, 0.8]) for s in range(3)}
    results |= {("gcode", 0): summary([0.1, 0.1], [nan, nan]), ("gcode", 1): summary([0.6, 0.7], [0.9, 0.7])}
    results[("gcode", 2)] = summary([0.55, 0.65], [0.9, 0.75])
    c = regimes.cell(results, "gcode")
    assert c["seeds"] == [0, 1, 2] and c["diverged"] == 1 and regimes.cell(results, "baseline")["diverged"] == 0
    assert regimes._verdict("gcode", c) == "within noise (1 of 3 diverged)"
    assert regimes._verdict("baseline", regimes.cell(results, "baseline")) == "—"


def test_gcw_mechanism_pairs_each_records_cosines_by_epoch(tmp_path):
    site = "layer1.2.conv2.weight"
    lines = [{"epoch": 0, "val_acc": 0.1}]
    for epoch, recs in ((1, [(0.5, 0.2, 0.1), (0.4, 0.3, 0.1)]), (2, [(0.2, 0.3, 0.2), (float("nan"), 0.1, 0.0)])):
        for i, (dg, g, ratio) in enumerate(recs):
            lines.append({"diag/step": 10 * epoch + i, f"diag/{site}/cos_dG_next": dg, f"diag/gcw:{site}/cos_next": g,
                          f"diag/{site}/ratio": ratio})  # fmt: skip
        lines.append({"epoch": epoch, "val_acc": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "m.json"
    printed = run("gcw_mechanism.py", str(tmp_path), "--json", str(out)).stdout
    per = json.loads(out.read_text())["sites"][site]
    assert per["1"]["records"] == 2 and abs(per["1"]["difference"]["mean"] - 0.2) < 1e-12  # (0.3 + 0.1) / 2
    assert per["2"]["records"] == 1 and per["2"]["difference"] is None  # the nan record (no correction) is left out
    assert per["all"]["records"] == 3 and abs(per["all"]["cos_dG_next"] - 1.1 / 3) < 1e-12
    assert f"| {site} | all | 3 |" in printed
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_acc": 0.5}) + "\n")
    refused = run("gcw_mechanism.py", str(tmp_path / "plain"), check=False)
    assert refused.returncode != 0 and "has no GC-W records" in refused.stderr


def test_regime_mechanism_reproduces_the_map_runs_and_diagnoses_their_weights(tmp_path):
    mapped = tmp_path / "map"
    run("regimes.py", "--quick", "--out", str(mapped), "--regimes", "resnet20", "--arms", "gcode", "--seeds", "0")
    out = tmp_path / "mech"
    argv = ["--quick", "--regime", "resnet20", "--arms", "baseline", "gcode", "--seeds", "0", "--every", "1",
            "--samples", "8", "--calibration", "16", "--out", str(out), "--map-runs", str(mapped / "runs")]  # fmt: skip
    done = run("regime_mechanism.py", *argv)
    assert "resnet20 gcode seed 0 epoch 2" in done.stdout
    res = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    base, gc = res["baseline"], res["gcode"]
    for r in (base, gc):  # trained alone with the recorder, each ends where the map's run of it did
        assert r["reproduces"]["equal"] is True and r["reproduces"]["map_final_val_acc"] == r["final_val_acc"]
    start = [s["grad_norm"] for s in base["insertion"]["states"]]  # same initial weights, gates at zero
    assert [s["grad_norm"] for s in gc["insertion"]["states"]] == pytest.approx(start, rel=1e-5)
    assert all(b["share"] == 0 for b in gc["insertion"]["branches"])
    assert len(gc["gates"]) == 3 and all(g > 0 for g in gc["gates"].values())  # the last epoch's weights, not epoch 0's
    assert all(b["share"] > 0 for b in gc["final"]["branches"]) and not base["gates"]
    assert len(gc["epochs"]) == 2 and gc["epochs"][1]["stage3"]["grad_norm"] > 0
    md = (out / "results.md").read_text()
    assert "stage weight-gradient norm" in md and "| gcode | 2 |" in md and "(= the map's)" in md
    assert (out / "norm_profile.png").read_bytes()[:4] == b"\x89PNG"
    again = run("regime_mechanism.py", *argv)  # resumes: every run is there
    assert "epoch" not in " ".join(line for line in again.stdout.splitlines() if line.startswith("resnet20 "))
    refused = run("regime_mechanism.py", "--quick", "--arms", "gcode:ode.gate=1", "--out", str(out), check=False)
    assert refused.returncode == 1 and "cannot read 'ode.gate=1'" in refused.stderr
