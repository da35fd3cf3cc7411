import json
import os

import pytest

from privacy.accounting import Step
from privacy.ledger import GENESIS_HASH, LedgerTampered, PrivacyLedger, entry_hash


def _ledger(tmp_path, n=5):
    led = PrivacyLedger(tmp_path / "h1" / "ledger.jsonl")
    led.append("dp_plan", run_id="r", noise_multiplier=1.1, delta=1e-5)
    for i in range(1, n):
        led.append("dp_round", run_id="r", round=i, task="ecg", steps=10 + i, sample_rate=0.01 * i,
                   noise_multiplier=1.1, max_grad_norm=1.0, accountant="prv", epsilon=0.1 * i, delta=1e-5)
    return led


def _lines(led):
    return led.path.read_text().splitlines(keepends=True)


def _write(led, lines):
    led.path.write_text("".join(lines))


def test_roundtrip_and_chain(tmp_path):
    led = PrivacyLedger(tmp_path / "l.jsonl")
    assert led.entries() == [] and led.head() == GENESIS_HASH
    e0 = led.append("dataset_commitment", run_id="r", sha384={"a.csv": "00ff"})
    e1 = led.append("dp_round", run_id="r", round=0, task="t", steps=3, sample_rate=0.1, noise_multiplier=1.0)
    got = led.entries()
    assert got == [e0, e1]
    assert [e["seq"] for e in got] == [0, 1]
    assert e0["prev_hash"] == GENESIS_HASH and e1["prev_hash"] == e0["hash"]
    assert led.head() == e1["hash"] == entry_hash(e1)
    assert e0["time"].endswith("Z") and "T" in e0["time"]
    # canonical: sorted keys, no whitespace
    first = led.path.read_text().splitlines()[0]
    assert first == json.dumps(json.loads(first), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert led.verify(expected_head=e0["hash"]) == e1["hash"]  # later appends are fine
    with pytest.raises(ValueError, match="reserved"):
        led.append("x", seq=5)
    with pytest.raises(ValueError, match="NaN/Infinity"):
        led.append("x", epsilon=float("inf"))
    assert len(led) == 2  # refused appends wrote nothing


def test_edit_a_value(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    lines[2] = lines[2].replace('"epsilon":0.2', '"epsilon":0.02')
    _write(led, lines)
    with pytest.raises(LedgerTampered, match=r"line 3 \(seq 2\): hash mismatch") as ei:
        led.entries()
    assert (ei.value.line, ei.value.seq) == (3, 2)


def test_reorder_two_lines(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    lines[1], lines[2] = lines[2], lines[1]
    _write(led, lines)
    with pytest.raises(LedgerTampered, match=r"line 2 has seq 2 where seq 1 was expected"):
        led.entries()


def test_delete_middle_line(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    del lines[2]
    _write(led, lines)
    with pytest.raises(LedgerTampered, match=r"line 3 has seq 3 where seq 2 was expected") as ei:
        led.verify()
    assert ei.value.line == 3


def test_truncated_partial_last_line(tmp_path):
    led = _ledger(tmp_path)
    raw = led.path.read_bytes()
    led.path.write_bytes(raw[:-20])
    with pytest.raises(LedgerTampered, match=r"line 5 \(expected seq 4\) is a partial line") as ei:
        led.entries()
    assert ei.value.reason == "truncated"
    led.path.write_bytes(raw[:-1])  # only the final newline lost: still a torn write
    with pytest.raises(LedgerTampered, match="partial line"):
        led.head()
    with pytest.raises(LedgerTampered):  # and a broken ledger is never extended
        led.append("dp_round", run_id="r")


def test_dropped_last_entries_detected_against_expected_head(tmp_path):
    led = _ledger(tmp_path)
    head = led.head()
    lines = _lines(led)
    _write(led, lines[:3])  # cut cleanly at a line boundary: the file alone still verifies
    assert len(led.entries()) == 3
    with pytest.raises(LedgerTampered, match=r"ends at seq 2 \(line 3.*from seq 3 \(line 4\) on are missing") as ei:
        led.verify(expected_head=head)
    assert ei.value.seq == 3


def test_insert_forged_line(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    # naive forgery: a copied entry with a changed value
    forged = json.loads(lines[2])
    forged["epsilon"] = 0.0
    _write(led, lines[:2] + [json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n"] + lines[2:])
    with pytest.raises(LedgerTampered, match=r"line 3 \(seq 2\): hash mismatch"):
        led.entries()
    # careful forgery: correct seq, prev_hash and hash; the chain breaks at the next line
    forged = {"seq": 2, "prev_hash": json.loads(lines[1])["hash"], "time": "2026-01-01T00:00:00Z",
              "event": "dp_round", "run_id": "r", "round": 9, "steps": 1, "sample_rate": 0.5,
              "noise_multiplier": 50.0}
    forged["hash"] = entry_hash(forged)
    _write(led, lines[:2] + [json.dumps(forged) + "\n"] + lines[2:])
    with pytest.raises(LedgerTampered, match=r"line 4 has seq 2 where seq 3 was expected"):
        led.entries()


def test_garbage_line(tmp_path):
    led = _ledger(tmp_path)
    lines = _lines(led)
    lines[1] = "not json\n"
    _write(led, lines)
    with pytest.raises(LedgerTampered, match=r"line 2 \(expected seq 1\) is not valid JSON"):
        led.entries()


def test_dp_history_roundtrip(tmp_path):
    led = _ledger(tmp_path, n=4)
    led.append("dp_round", run_id="other", round=0, steps=7, sample_rate=0.5, noise_multiplier=2.0)
    led.append("skipped_budget", run_id="r", round=5)
    assert led.dp_history("r") == [Step(1.1, 0.01, 11), Step(1.1, 0.02, 12), Step(1.1, 0.03, 13)]
    assert led.dp_history("other") == [Step(2.0, 0.5, 7)]
    assert len(led.dp_history()) == 4
    # a fresh object over the same file (a restarted client) sees the same history
    assert PrivacyLedger(led.path).dp_history("r") == led.dp_history("r")


def test_append_fsyncs_before_returning(tmp_path, monkeypatch):
    led = PrivacyLedger(tmp_path / "l.jsonl")
    led.append("dp_plan", run_id="r")
    calls = []
    real_fsync = os.fsync

    def spy(fd):
        # at fsync time the line must already be written (so it is what gets synced)
        calls.append(led.path.read_text().count("\n"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    led.append("dp_round", run_id="r", round=0, steps=1, sample_rate=0.1, noise_multiplier=1.0)
    assert calls and calls[0] == 2
