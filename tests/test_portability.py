"""The C++ kernels build on any architecture: x86 intrinsics only behind their guards.

The sources are compiled (syntax only) for aarch64 with the cross compiler
``aarch64-linux-gnu-g++``, which has no ``<immintrin.h>``: an unguarded x86 include or
intrinsic fails there. ``.ci/run`` installs the cross compiler; elsewhere the test runs when
it is present, and CI fails rather than skip when it is not.
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CROSS = "aarch64-linux-gnu-g++"


def cross_compiler():
    found = shutil.which(CROSS)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CROSS} is missing: .ci/run installs it (Debian package g++-aarch64-linux-gnu)")
        pytest.skip(f"{CROSS} is not installed (apt-get install g++-aarch64-linux-gnu)")
    return found


def compile_for_aarch64(source: Path) -> subprocess.CompletedProcess:
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    return subprocess.run([cross_compiler(), "-std=c++17", "-fsyntax-only", "-w", *flags, str(source)],
                          capture_output=True, text=True, timeout=300)


SOURCES = sorted(p.name for p in CSRC.glob("*.cpp"))


@pytest.fixture(scope="module")
def aarch64_builds():
    """Every source compiled once, as many at a time as there are cores (the suite's time)."""
    from concurrent.futures import ThreadPoolExecutor

    cross_compiler()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(SOURCES, pool.map(lambda name: compile_for_aarch64(CSRC / name), SOURCES)))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_kernels_compile_for_aarch64(source, aarch64_builds):
    result = aarch64_builds[source]
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_an_unguarded_intrinsic_is_caught(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text('#include "common.h"\n#include <immintrin.h>\nstatic __m256 lanes;\n')
    assert compile_for_aarch64(bad).returncode != 0
