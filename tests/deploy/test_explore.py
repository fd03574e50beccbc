"""``torchlns.explore`` (Note: design-space exploration in torchlns/deploy/explore.py): the space,
each design's measurements against their definitions, the fronts, resuming, parallel workers,
the time budget, and the command line on the demo network."""

import json
import math

import pytest
import torch
import torch.nn as nn

import torchlns
from torchlns import ConvertConfig, LNSFormat, MACConfig
from torchlns.deploy.explore import CHIP_PRESET, Design, DesignSpace, ExploreResult, _fidelity, explore


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    held = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(2)]
    return model, calib, held


SPACE = DesignSpace(bits=(6, 8), acc_bits=(16, 32), chunks=((0, 0), (8, 12)))


def test_the_space():
    grid = SPACE.grid()
    assert len(grid) == 8 and len({d.key for d in grid}) == 8
    assert SPACE.designs()[0] == CHIP_PRESET  # the preset first when it is in the space
    wide = DesignSpace(bits=(4, 8), frac_bits=(2, 3, 4), conversion=("lut", "mitchell"), lut_bits=(6, 8))
    # F <= bits - 2, and a conversion without a table once, whatever lut_bits says
    assert len(wide.grid()) == (2 + 1) + 3 * (2 + 1)
    assert DesignSpace(acc_bits=(16,), chunks=((8, 20),)).grid() == []  # chunk_bits above acc_bits
    arch = DesignSpace.architect(samples=None)
    assert len(arch.grid()) >= 1000
    sample = DesignSpace.architect(samples=48, seed=3).designs()
    assert len(sample) == 48 and sample[0] == CHIP_PRESET and sample == DesignSpace.architect(48, 3).designs()
    assert sample != DesignSpace.architect(48, 4).designs()
    with pytest.raises(ValueError, match="at least one"):
        DesignSpace(bits=())
    with pytest.raises(ValueError, match="lut_bits"):
        Design(lut_bits=30)


def test_a_design_is_a_config():
    d = Design(bits=10, frac_bits=4, conversion="mitchell", acc_bits=24, overflow="wrap", chunk=16, chunk_bits=16,
               weight_granularity="block", clusters=16)
    c = d.config(ConvertConfig(calibrator="mse"))
    assert c.fmt == LNSFormat(10, 4) and c.calibrator == "mse" and c.weight_block_size == 32
    assert c.mac == MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=24, overflow="wrap", chunk=16,
                              chunk_bits=16)
    assert c.cluster.num_clusters == 16
    assert d.name == "LNS10 F=4 mitchell acc24 wrap chunk16x16 w/block C=16"
    assert Design(**json.loads(d.key)) == d
    assert CHIP_PRESET.config().mac == MACConfig.chip() and CHIP_PRESET.config().fmt == torchlns.LNS8


def test_measurements_fronts_and_files(tmp_path):
    model, calib, held = _problem()
    r = explore(model, calib, SPACE, eval_data=held, tolerance=0.01)
    assert len(r.rows) == 8 and all(row["error"] is None for row in r.rows)
    ref = torch.cat([model(x) for x in held]).detach()
    for row in r.rows:  # each measurement against its definition
        d = Design(**row["design"])
        q = torchlns.convert(model, d.config(), calibration_data=calib)
        with torch.no_grad():
            out = torch.cat([q(x) for x in held])
        f = _fidelity(out, ref)
        assert row["agreement"] == f["agreement"] == row["score"]
        assert row["sqnr_db"] == f["sqnr_db"] and row["kl"] == f["kl"]
        assert row["bytes"] == torchlns.size_report(q).total_bytes
        assert row["energy_pj"] == pytest.approx(torchlns.cost_report(q, held[0][:1]).energy_pj)
    for cost in ("energy_pj", "bytes"):  # the front by its definition
        front = {x["key"] for x in r.front(cost)}
        for row in r.rows:
            dominated = any(o["score"] >= row["score"] and o[cost] <= row[cost] and
                            (o["score"] > row["score"] or o[cost] < row[cost]) for o in r.rows)
            assert (row["key"] in front) == (not dominated)
    p = r.preset
    assert p is not None and p["mac_pj"] > min(row["mac_pj"] for row in r.rows)  # the datapath moves the MAC's cost
    assert all(b["energy_pj"] < p["energy_pj"] and b["score"] >= p["score"] - 0.01 for b in r.beats_preset())
    strict = r.beats_preset(strict=True)
    assert all(b["sqnr_db"] >= p["sqnr_db"] and b["kl"] <= p["kl"] for b in strict)
    assert {b["key"] for b in strict} <= {b["key"] for b in r.beats_preset()}
    text = str(r)
    assert "(chip preset)" in text and ("beats the chip preset" in text or "no design beats" in text)
    data = json.loads(r.to_json(tmp_path / "e.json").read_text())
    assert data["preset"] == CHIP_PRESET.key and len(data["rows"]) == 8 and data["front_energy"]
    from PIL import Image

    with Image.open(r.plot(tmp_path / "e.png")) as im:
        assert im.size == (1120, 400)


def test_resume_budget_and_refusals(tmp_path, monkeypatch):
    model, calib, held = _problem()
    path = tmp_path / "results.jsonl"
    first = explore(model, calib + held, DesignSpace(bits=(6, 8)), results=path)  # halves: calibrate, evaluate
    assert len(first.rows) == 2 and len(path.read_text().splitlines()) == 3
    import importlib

    mod = importlib.import_module("torchlns.deploy.explore")

    ran = []
    real = mod._Job.run
    monkeypatch.setattr(mod._Job, "run", lambda self, d: ran.append(d) or real(self, d))
    again = explore(model, calib + held, DesignSpace(bits=(6, 8, 10)), results=path)
    assert [d.bits for d in ran] == [10] and len(again.rows) == 3  # two resumed
    with path.open("a") as f:
        f.write('{"key": "cut sh')  # an interrupted write
    assert len(explore(model, calib + held, DesignSpace(bits=(6, 8, 10)), results=path).rows) == 3
    with pytest.raises(ValueError, match="another model or other data"):
        explore(model, calib + calib, DesignSpace(), results=path)
    out = explore(model, calib, SPACE, eval_data=held, time_budget=0)
    assert out.rows == [] and len(out.skipped) == 8 and "not started" in str(out)
    with pytest.raises(ValueError, match="eval_data"):
        explore(model, calib[:1])
    with pytest.raises(ValueError, match="workers"):
        explore(model, calib, workers=0, eval_data=held)


def test_parallel_workers_give_the_same_rows():
    model, calib, held = _problem()
    space = DesignSpace(bits=(6, 8), overflow=("saturate", "wrap"))
    one = explore(model, calib, space, eval_data=held)
    two = explore(model, calib, space, eval_data=held, workers=2)
    keep = ("agreement", "kl", "sqnr_db", "bytes", "energy_pj")
    assert {r["key"]: [r[k] for k in keep] for r in one.rows} == {r["key"]: [r[k] for k in keep] for r in two.rows}


def test_a_design_the_network_cannot_take_is_an_error_row():
    model, calib, held = _problem()
    r = explore(model, calib, DesignSpace(weight_granularity=("block",), bits=(6,)), eval_data=held)
    assert len(r.rows) == 1
    row = r.rows[0]
    assert row["error"] is None or isinstance(row["error"], str)
    bad = ExploreResult([dict(key="k", name="x", error="too narrow", seconds=0.0)], "agreement")
    assert "error: too narrow" in bad.table() and bad.front() == []


def test_explore_command_on_the_demo_network(tmp_path, capsys):
    from torchlns.__main__ import main

    out = tmp_path / "ex"
    argv = ["explore", "--samples", "3", "--workers", "1", "--calib-scenes", "8", "--eval-scenes", "8", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "(chip preset)" in text
    assert (out / "explore.png").is_file() and len(json.loads((out / "explore.json").read_text())["rows"]) == 3
    assert main(argv) == 0  # resumed: nothing left to evaluate
    assert "3/3 designs (3 resumed)" not in capsys.readouterr().err  # no design ran again
    assert main(["explore", "--bits", "4", "--frac-bits", "3", "-o", str(out)]) == 2
    assert "design space" in capsys.readouterr().err


def test_workers_leave_with_a_killed_parent(tmp_path):
    """A parent killed outright cannot shut its pool down; the spawned workers notice and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(  # designs that take tens of seconds each: two-stage MACs on 128x128 inputs
        "import torch, torch.nn as nn, torchlns\n"
        "from torchlns.deploy.explore import DesignSpace, explore\n"
        "if __name__ == '__main__':  # spawned workers import this file again\n"
        "    m = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)).eval()\n"
        "    x = [torch.randn(8, 3, 128, 128) for _ in range(8)]\n"
        "    explore(m, x, DesignSpace(bits=(8, 10), overflow=('wrap',), chunks=((16, 16),)), workers=2)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        out = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = open(f"/proc/{pid}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent.pid:
                    out.append(int(pid))
        return out

    deadline = time.time() + 60
    kids = []
    while time.time() < deadline and len(kids) < 2:
        time.sleep(0.5)
        kids = []
        for k in children():
            try:
                if "spawn_main" in open(f"/proc/{k}/cmdline").read():
                    kids.append(k)
            except OSError:
                pass
    assert len(kids) >= 2, "the workers did not start"
    time.sleep(8)  # well into their first designs (spawned workers take seconds to import torch)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 6
    while time.time() < deadline and any(running(k) for k in kids):
        time.sleep(0.5)
    alive = [k for k in kids if running(k)]
    for k in alive:
        os.kill(k, signal.SIGKILL)
    assert not alive
