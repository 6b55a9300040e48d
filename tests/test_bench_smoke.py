"""The benchmark runs end to end at tiny counts and writes every section, contender and ratio.

The numbers of a tiny run mean nothing; this checks the program, not the library's speed.
"""
import json
import os
import subprocess
import sys

import pytest

from uringsend.measure import STABLE_MODES, URING_MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STABLE = [f"uringsend-{m}" for m in STABLE_MODES]
CONTENDERS = ["splice", "sendfile", "read-send"] + [f"uringsend-{m}" for m in URING_MODES]
ONESHOT = "uringsend.sendfile"
PNG = b"\x89PNG\r\n\x1a\n"


def run_bench(out, *args):
    # below pytest's own timeout (120 s), so that a stuck run is killed rather than left behind
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_bench(out)
    return out, proc, json.loads((out / "latest.json").read_text())


def test_every_contender_and_size_has_latency_percentiles_and_ratios(tiny):
    _, _, result = tiny
    assert result["contenders"] == list(CONTENDERS)
    sizes = [str(s) for s in result["config"]["sizes"]]
    assert sizes == ["4096", "65536", "1048576", "16777216"]
    for name in CONTENDERS:
        for size in sizes:
            row = result["latency"][name][size]
            assert row["n"] == result["config"]["counts"][size]
            assert 0 < row["p50_us"] <= row["p99_us"] <= row["p999_us"]
            assert row["ratio_p50_vs_splice"] > 0 and row["ratio_p99_vs_splice"] > 0
            if name in STABLE:
                release = result["release"][name][size]
                assert release["n"] == row["n"] and 0 < release["p50_us"] <= release["p99_us"]
    assert sorted(result["release"]) == sorted(STABLE)
    assert result["latency"]["splice"]["4096"]["ratio_p50_vs_splice"] == 1.0


def test_zerocopy_rows_report_copied_and_zerocopy_chunks(tiny):
    _, _, result = tiny
    for name in ("uringsend-zerocopy", "uringsend-mmap"):
        row = result["latency"][name]["65536"]
        assert row["chunks_copied"] + row["chunks_zerocopy"] >= row["n"]
        row = result["throughput"][name]
        assert row["chunks_copied"] + row["chunks_zerocopy"] > 0


def test_throughput_cost_and_concurrency_sections(tiny):
    _, _, result = tiny
    for name in CONTENDERS:
        assert result["throughput"][name]["gbps"] > 0
        assert result["throughput"][name]["ratio_throughput_vs_splice"] > 0
        cost = result["cost"][name]
        assert cost["cpu_s_per_gb"] >= 0 and "rss_peak_growth_mib" in cost
        assert cost["fds_after"] == cost["fds_before"]
    assert list(result["concurrency"]) == ["1", "16", "64"]
    for rows in result["concurrency"].values():
        assert list(rows) == ["splice-threads"] + [f"uringsend-{m}" for m in URING_MODES]
        for row in rows.values():
            assert row["requests"] > 0 and row["gbps"] > 0
            assert row["ratio_throughput_vs_splice"] > 0 and row["ratio_p99_vs_splice"] > 0
    assert result["fds"]["start"] == result["fds"]["end"]


def test_cost_per_transfer_section(tiny):
    out, _, result = tiny
    per = result["cost_per_transfer"]
    assert list(per) == CONTENDERS + [ONESHOT]
    assert result["config"]["cost_transfer_sizes"] == [4096, 65536]
    for name, rows in per.items():
        assert list(rows) == ["4096", "65536"]
        for size, row in rows.items():
            assert row["transfers"] > 0 and row["cpu_us"] > 0 and row["wall_us"] > 0
            assert row["ratio_cpu_vs_splice"] == pytest.approx(row["cpu_us"] / per["splice"][size]["cpu_us"], abs=1e-3)
            assert row["ratio_cpu_vs_sendfile"] == pytest.approx(row["cpu_us"] / per["sendfile"][size]["cpu_us"],
                                                                 abs=1e-3)
    table = (out / "latest.md").read_text()
    assert "### Cost per transfer" in table and f"| 64 KiB | {ONESHOT} |" in table


def test_targets_machine_and_files(tiny):
    out, proc, result = tiny
    names = [t["target"] for t in result["targets"]]
    assert len(names) == 11
    for words in ("from memory: stream writer", "best stable mode >= 0.6x", "best mode >= 1.0x", "64 KiB latency: best stable mode p50 and p99 <= 1.1x",
                  "4 KiB cost per transfer: copy <= 1.0x blocking splice", "copy <= 1.2x os.sendfile",
                  "uringsend.sendfile() <= 1.3x os.sendfile", "requests/s"):
        assert any(words in n for n in names), words
    assert {t["status"] for t in result["targets"]} <= {"PASS", "MISS"}
    for key in ("host", "kernel", "cpu_model", "cores_logical", "python"):
        assert result["machine"][key]
    assert set(result["fastest"]["latency_p50"]) == set(result["latency"]["splice"])
    stamped = out / f"{result['machine']['host']}-{result['stamp']}.json"
    assert json.loads(stamped.read_text()) == result
    for png in ("latency.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == PNG
    table = (out / "latest.md").read_text()
    assert "| 4 KiB | uringsend-copy |" in table and table in proc.stdout


def test_json_only_writes_only_json_for_the_sizes_asked(tmp_path):
    proc = run_bench(tmp_path, "--json-only", "--sizes", "4K,64K", "--requests", "8")
    assert sorted(os.listdir(tmp_path)) == sorted(["latest.json", os.path.basename(proc.stdout.strip())])
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["config"]["counts"] == {"4096": 8, "65536": 8}


def test_plots_are_skipped_without_matplotlib(tiny, tmp_path):
    out, _, _ = tiny
    code = ("import json, sys; sys.modules['matplotlib'] = None; from bench import report; "
            "print(json.dumps(report.write(json.load(open(sys.argv[1])), sys.argv[2], False)))")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "latest.json"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "plots skipped" in proc.stderr and "matplotlib" in proc.stderr
    written = [os.path.basename(p) for p in json.loads(proc.stdout)]
    assert "latest.md" in written and not any(p.endswith(".png") for p in written)
    assert not list(tmp_path.glob("*.png"))
