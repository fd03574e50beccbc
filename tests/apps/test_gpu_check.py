"""``python -m torchlns gpu-check``: the command runs end to end (on the CPU, through the
Triton interpreter, at toy sizes) and refuses clearly where it cannot run."""

import os

import pytest
import torch

pytest.importorskip("triton")

from torchlns.__main__ import main  # noqa: E402
from torchlns.apps import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs for real (python -m torchlns gpu-check)")
def test_gpu_check_runs_on_the_interpreter(tmp_path, capsys):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    out = tmp_path / "gpu.md"
    assert main(["gpu-check", "--device", "cpu", "--no-tests", "--size", "32", "--image", "8", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ["lns_mm 32^3, LNS8 ideal", "LNS8 chip LUT8, float32 acc", "chip preset (LUT8, fixed 32-bit acc)",
                "largest error / spec bound", "conv2d", "LNS8 encode", "LNS8 decode", "converted resnet-tiny forward",
                "GPU outputs vs the CPU kernels"]:
        assert row in text, row
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    bits = next(v for k, v in lines.items() if k.startswith("converted network"))
    assert "bit-equal" in bits and bits.rstrip().endswith("| yes |")  # the fixed accumulator: the CPU's bits
    bound = next(v for k, v in lines.items() if k.startswith("float32 accumulator"))
    assert bound.rstrip().endswith("| yes |")
    assert "(on a GPU)" in lines[next(k for k in lines if k.startswith("lns_mm"))]  # no verdict from the interpreter
    assert text in capsys.readouterr().out


def test_gpu_check_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu-check", "--no-tests"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err and "--device cpu" in err


def test_gpu_check_refuses_the_cpu_without_the_interpreter(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["gpu-check", "--device", "cpu", "--no-tests"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--size", "0"], "--size must be a positive integer"),
                                          (["--network", "alexnet"], "unknown network 'alexnet'")])
def test_gpu_check_validates_its_arguments(argv, message, capsys):
    assert main(["gpu-check", "--device", "cpu", "--no-tests", *argv]) == 2
    assert message in capsys.readouterr().err


def test_markdown_table():
    checks = [gpu_check.Check("a", "1 ms", "2.00x (2.00 ms)", "", ">= 1.0x float32", True),
              gpu_check.Check("b", "x", target="bit-equal", met=False), gpu_check.Check("c", "y")]
    text = gpu_check.to_markdown(checks, "# head")
    assert text.splitlines()[2] == "| measure | torchlns | vs float32 (TF32 off) | vs bf16 | target | met |"
    assert "| a | 1 ms | 2.00x (2.00 ms) |  | >= 1.0x float32 | yes |" in text
    assert "| b | x |  |  | bit-equal | **no** |" in text and "| c | y |  |  |  |  |" in text
