"""`python -m torchlns formats` runs end to end and prints a complete, finite error table."""

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ROWS = [
    ("LNS8", "ideal"),
    ("LNS8", "chip"),
    ("LNS8 mitchell", "ideal"),
    ("LNS8 mitchell", "chip"),
    ("FP8 e4m3", "fp32 acc"),
    ("FP8 e5m2", "fp32 acc"),
    ("INT8", "int acc"),
]
N_NUMBERS = 5  # enc SQNR, max rel err, flushed %, linear SQNR, conv2d SQNR


def _run_demo():
    proc = subprocess.run(
        [sys.executable, "-m", "torchlns", "formats"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _table(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("format"))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        numbers = [float(c) for c in cells[-N_NUMBERS:]]
        label = " ".join(cells[:-N_NUMBERS])
        rows[label] = numbers
    return rows


def test_demo_prints_full_finite_table():
    stdout = _run_demo()
    assert "cpu backend: native" in stdout
    rows = _table(stdout)
    assert list(rows) == [f"{fmt} {mac}" for fmt, mac in EXPECTED_ROWS]
    for label, (enc, rel, flushed, lin, conv) in rows.items():
        assert all(math.isfinite(v) for v in (enc, rel, flushed, lin, conv)), label
        # 8-bit formats: a few tens of dB of SQNR, a bounded relative error.
        assert 10 < enc < 80, label
        assert 10 < lin < 80 and 10 < conv < 80, label
        assert 0 <= rel <= 1 and 0 <= flushed <= 100, label
    # LNS8 with nearest rounding: relative error at most 2^(1/16) - 1 inside its range.
    assert rows["LNS8 ideal"][1] <= 2 ** (1 / 16) - 1 + 5e-5  # printed to 4 decimals


def test_cli_requires_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "torchlns"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "demo" in proc.stderr
