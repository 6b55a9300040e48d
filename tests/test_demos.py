"""The command line and its demos: real transfers over loopback, checked through --json."""
import importlib.util
import json
import subprocess
import sys

import pytest

from uringsend import demos
from uringsend.cli import size_arg


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "uringsend", *args], capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_json(*args):
    return json.loads(run(*args, "--json").stdout)


def test_probe_json_lists_opcodes_by_name():
    info = run_json("probe")
    assert info["io_uring"] is True
    assert "SEND_ZC" in info["opcodes"] and "SPLICE" in info["opcodes"]
    assert "mmap" in info["modes"]


def test_probe_table_is_plain_text_when_piped():
    out = run("probe").stdout
    assert "SEND_ZC" in out and "pipe-max-size" in out
    assert "\x1b[" not in out


def test_notify_every_chunk_is_sent_then_released():
    size = 1 << 20
    r = run_json("demo", "notify", "--size", str(size))
    assert r["ok"] and r["mode"] == "mmap"
    s = r["summary"]
    assert s["bytes"] == size and s["released_bytes"] == size
    sent = {e["offset"]: e["t_us"] for e in r["events"] if e["kind"] == "sent"}
    released = {e["offset"]: e["t_us"] for e in r["events"] if e["kind"] == "released"}
    assert sum(e["nbytes"] for e in r["events"] if e["kind"] == "sent") == size
    assert sent.keys() == released.keys() and len(sent) == s["chunks"] == 4
    assert all(sent[o] <= released[o] for o in sent)
    # One SEND_ZC result with MORE, then one NOTIF with the same user_data, copied on loopback.
    results = [row for row in r["timeline"] if row["flags_decoded"] == ["MORE"]]
    notifs = [row for row in r["timeline"] if row["flags_decoded"] == ["NOTIF"]]
    assert sorted(row["user_data"] for row in results) == sorted(row["user_data"] for row in notifs)
    assert all(row["copied"] is True and row["res"] == -2**31 for row in notifs)
    assert s["copied"] == s["notifications"] == 4 and s["zerocopy"] == 0


def test_notify_slow_reader_still_delivers_everything():
    r = run_json("demo", "notify", "--size", "1M", "--slow-reader")
    assert r["ok"] and r["slow_reader"]
    assert r["summary"]["peer_first_recv"] <= demos.SLOW_PIECE
    assert r["summary"]["released_bytes"] == 1 << 20


def test_notify_splice_is_queued_never_released():
    r = run_json("demo", "notify", "--mode", "splice", "--size", "1M")
    assert r["ok"]
    assert {e["kind"] for e in r["events"]} == {"queued"}
    assert not any("NOTIF" in row["flags_decoded"] for row in r["timeline"])


def test_hazard_only_splice_and_early_write_change_what_the_peer_gets():
    r = run_json("demo", "hazard")
    assert r["ok"]
    rows = {(x["mode"], x["written"]): x for x in r["rows"]}
    size = r["size"]
    assert all(x["bytes"] == size for x in rows.values())
    assert rows["splice", "after result()"]["new_bytes"] > 0
    assert rows["zerocopy", "after result()"]["new_bytes"] == 0
    assert rows["mmap", "after released()"]["new_bytes"] == 0
    assert rows["mmap", "after released()"]["released_before_write"] == size
    early = rows["mmap", "after result()"]
    assert early["released_before_write"] < size and early["new_bytes"] > 0
    assert "copies SEND_ZC data" in r["note"]


def test_header_and_body_arrive_as_one_stream():
    size = 256 << 10
    r = run_json("demo", "header", "--size", str(size))
    assert r["ok"]
    assert r["peer_bytes"] == r["header_len"] + size
    head = [e for e in r["header_events"] if e["kind"] == "sent"]
    assert sum(e["nbytes"] for e in head) == r["header_len"]
    assert all(e["offset"] is None for e in r["header_events"])


def test_tee_every_peer_gets_the_file():
    r = run_json("demo", "tee", "--sockets", "4", "--size", "1M")
    assert r["ok"] and len(r["peers"]) == 4
    assert all(p["identical"] and p["kinds"] == ["queued"] for p in r["peers"])


def test_demo_with_no_name_runs_them_all():
    proc = run("demo")
    assert "all 5 demos passed their checks" in proc.stdout
    assert "\x1b[" not in proc.stdout and proc.stderr == ""


def test_demo_runs_in_process_without_leaking():
    r = demos.header(mode="zerocopy", size=300_000)
    assert r["ok"] and r["peer_bytes"] == r["header_len"] + 300_000


def test_serve_is_offered_only_with_a_server():
    has_server = importlib.util.find_spec("uringsend.server") is not None
    proc = run("serve", "--help", check=False)
    assert (proc.returncode == 0) == has_server, proc.stderr


@pytest.mark.parametrize("text, n", [("4194304", 4 << 20), ("4M", 4 << 20), ("256k", 256 << 10),
                                     ("1MiB", 1 << 20)])
def test_size_argument(text, n):
    assert size_arg(text) == n


def test_bad_size_is_a_usage_error():
    proc = run("demo", "notify", "--size", "lots", check=False)
    assert proc.returncode == 2 and "not a positive size" in proc.stderr
