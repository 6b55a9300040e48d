"""python -m uringsend compare runs end to end at tiny settings: every contender at both sizes, in
both sections, with ratios that follow from the values. The numbers of so short a run mean nothing;
this checks the program, not the library's speed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = (["splice", "sendfile", "read-send"]
              + [f"uringsend-{m}" for m in ("splice", "zerocopy", "mmap", "copy", "auto")]
              + ["uringsend.sendfile"])
STABLE = ["uringsend-zerocopy", "uringsend-mmap", "uringsend-copy", "uringsend-auto"]
SIZES = ["4096", "65536"]
TINY = ("--seconds", "1", "--rounds", "2")


def compare(*args):
    # below pytest's own timeout (120 s), so that a stuck run is killed rather than left behind
    proc = subprocess.run([sys.executable, "-m", "uringsend", "compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"compare failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def result():
    proc = compare("--json", *TINY)
    assert "cost per transfer round 2/2 done" in proc.stderr and "latency round 2/2 done" in proc.stderr
    return json.loads(proc.stdout)


def test_every_contender_at_both_sizes(result):
    assert result["contenders"] == CONTENDERS
    assert result["sizes"] == [4096, 65536] and result["rounds"] == 2
    for section in ("cost_per_transfer", "latency"):
        assert list(result[section]) == CONTENDERS, section
        for name in CONTENDERS:
            assert sorted(result[section][name], key=int) == SIZES, (section, name)
    assert sorted(result["release"]) == sorted(STABLE)


def test_cost_rows_are_positive_and_ratios_follow_from_them(result):
    cost = result["cost_per_transfer"]
    for name in CONTENDERS:
        for size in SIZES:
            row = cost[name][size]
            assert row["rounds"] == 2 and len(row["cpu_us_per_round"]) == 2
            assert row["transfers"] >= 2 * 10  # at least ten transfers a round
            assert row["cpu_us"] > 0 and row["thread_cpu_us"] > 0 and row["wall_us"] > 0
            assert min(row["cpu_us_per_round"]) <= row["cpu_us"] <= max(row["cpu_us_per_round"])
            for ref, field in (("splice", "ratio_cpu_vs_splice"), ("sendfile", "ratio_cpu_vs_sendfile")):
                assert row[field] == pytest.approx(row["cpu_us"] / cost[ref][size]["cpu_us"], abs=1e-3)
    for size in SIZES:
        assert cost["splice"][size]["ratio_cpu_vs_splice"] == 1.0
        assert cost["sendfile"][size]["ratio_cpu_vs_sendfile"] == 1.0


def test_latency_rows_are_positive_and_ratios_follow_from_them(result):
    lat = result["latency"]
    for name in CONTENDERS:
        for size in SIZES:
            row = lat[name][size]
            assert row["n"] == lat["splice"][size]["n"] >= 2
            assert 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
            for q in ("p50", "p99"):
                ref = lat["splice"][size][f"{q}_us"]
                assert row[f"ratio_{q}_vs_splice"] == pytest.approx(row[f"{q}_us"] / ref, abs=1e-3)
            if name in STABLE:
                assert result["release"][name][size]["n"] == row["n"]


def test_table_names_every_contender_and_size():
    proc = compare(*TINY, "--sizes", "4K")
    out = proc.stdout
    assert "cost per transfer" in out and "latency" in out
    lines = [line.split() for line in out.splitlines()]
    for name in CONTENDERS:
        assert sum(1 for cells in lines if cells[:3] == ["4", "KiB", name]) == 2, name  # one row per section
    assert "64 KiB" not in out


@pytest.mark.parametrize("args", [("--rounds", "0"), ("--seconds", "-1"), ("--sizes", "4K,x")])
def test_bad_arguments_are_refused(args):
    proc = subprocess.run([sys.executable, "-m", "uringsend", "compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error" in proc.stderr
