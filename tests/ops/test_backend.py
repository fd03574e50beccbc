"""The backend selector: native extension present, and the fallback when it is not."""

import sys
import warnings

import pytest
import torch

from torchlns.ops import backend as _backend
from torchlns.ops.backend import TorchLNSBackendWarning, backend_info, has_native

KEYS = {"cpu", "cuda", "triton_error", "cuda_available", "native_error", "torch_version", "build_info"}


@pytest.fixture
def fresh_backend():
    """Forget the cached load attempt before and after the test."""
    _backend._reset()
    yield _backend
    _backend._reset()


def test_backend_info_keys():
    info = backend_info()
    assert KEYS <= set(info)
    assert info["cpu"] in ("native", "reference")
    assert info["cuda"] in ("triton", "reference")
    assert info["torch_version"] == torch.__version__


def test_native_extension_is_built():
    # CI builds the extension (`pip install --no-build-isolation -e .`), so it must load.
    info = backend_info()
    assert info["native_error"] is None, info["native_error"]
    assert has_native()
    assert info["cpu"] == "native"
    build = info["build_info"]
    assert isinstance(build["compiler"], str) and build["compiler"]
    assert isinstance(build["openmp"], bool)
    assert isinstance(build["num_threads"], int) and build["num_threads"] >= 1
    assert build["cplusplus"] >= 201703


def test_missing_extension_warns_once_and_falls_back(fresh_backend, monkeypatch):
    # A None entry in sys.modules makes `import torchlns._C` raise ImportError.
    monkeypatch.setitem(sys.modules, "torchlns._C", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = backend_info()
        assert not has_native()
        assert backend_info()["cpu"] == "reference"
        assert fresh_backend.native() is None
    ours = [w for w in caught if issubclass(w.category, TorchLNSBackendWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    msg = str(ours[0].message)
    assert "torchlns._C" in msg
    assert "pip install --no-build-isolation -e ." in msg
    assert "reference" in msg
    assert info["cpu"] == "reference"
    assert info["cuda"] in ("triton", "reference")  # CUDA does not depend on the C++ extension
    assert info["build_info"] is None
    assert "Error" in info["native_error"]  # ImportError or ModuleNotFoundError
    assert info["native_error"] in msg


def test_loader_error_text_is_reported(fresh_backend, monkeypatch):
    def broken():
        raise ImportError("undefined symbol: _ZN3c104fake")

    monkeypatch.setattr(fresh_backend, "_import_native", broken)
    with pytest.warns(TorchLNSBackendWarning, match="undefined symbol"):
        info = backend_info()
    assert info["native_error"] == "ImportError: undefined symbol: _ZN3c104fake"
    assert info["cpu"] == "reference"


def test_warning_is_a_user_warning():
    assert issubclass(TorchLNSBackendWarning, UserWarning)


FALLBACK_SCRIPT = r"""
import sys, warnings
sys.modules["torchlns._C"] = None  # the import fails, as with a build that has no compiler
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, torchlns
names = [type(w.message).__name__ for w in caught if "torchlns._C" in str(w.message)]
assert names == ["TorchLNSBackendWarning"], names
assert torchlns.backend_info()["cpu"] == "reference"
assert not torch._C._dispatch_has_kernel_for_dispatch_key("torchlns::lns_mm", "CPU")
torch.manual_seed(0)
x, w = torch.randn(5, 40), torch.randn(7, 40)
y = torchlns.lns_linear(x, w, torch.randn(7), torchlns.CHIP_MAC, acc_lsb=-20)
codes = torchlns.encode(torch.randn(1000) * 100, torchlns.LNS8, -100)
print(y.view(torch.int32).sum().item(), codes.to(torch.int64).sum().item())
"""


def test_reference_takes_over_without_the_extension_with_the_same_bits():
    import subprocess
    import sys

    import torch

    import torchlns

    run = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.manual_seed(0)
    x, w = torch.randn(5, 40), torch.randn(7, 40)
    y = torchlns.lns_linear(x, w, torch.randn(7), torchlns.CHIP_MAC, acc_lsb=-20)
    codes = torchlns.encode(torch.randn(1000) * 100, torchlns.LNS8, -100)
    assert run.stdout.split() == [str(y.view(torch.int32).sum().item()), str(codes.to(torch.int64).sum().item())]
