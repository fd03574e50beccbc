"""Builds the native extension ``torchlns._C`` from ``csrc/*.cpp``.

Everything else (metadata, dependencies) lives in pyproject.toml. The extension links
against the torch that is already installed, so build without isolation:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

An editable install builds the extension in place (``torchlns/_C*.so``), so
``import torchlns._C`` works from the repository root, where the source tree shadows
site-packages.
"""

import glob
import os
import subprocess
import sys
import tempfile

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, library_paths

HERE = os.path.dirname(os.path.abspath(__file__))


def _openmp_flags():
    """``-fopenmp`` if the C++ compiler accepts it, else nothing (the build stays serial)."""
    if os.environ.get("TORCHLNS_NO_OPENMP"):
        return []
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run(
                [cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            return []
    if r.returncode != 0:
        print("torchlns: OpenMP not available, building without it", file=sys.stderr)
        return []
    return ["-fopenmp"]


class IncrementalBuildExtension(BuildExtension):
    """Object files in build/temp, kept between builds, so ninja recompiles only what changed.

    pip builds an editable install in a fresh temporary directory each time, which made the
    README's second command (the tests, with the test extras) compile everything again.
    """

    def finalize_options(self):
        super().finalize_options()
        # One folder per torch version: its headers are system includes, which the
        # dependency files leave out, so a new torch must not reuse old objects.
        self.build_temp = os.path.join(HERE, "build", f"temp-torch-{torch.__version__}")
        print(f"torchlns: compiling the C++ extension in {self.build_temp} (a few minutes the first time; "
              "`pip install -v` shows each step)", file=sys.stderr)


omp = _openmp_flags()
# Record torch's library directory as an rpath so that the extension also loads when it is
# imported before torch itself (e.g. `python -c "import torchlns._C"`).
rpath = [f"-Wl,-rpath,{d}" for d in library_paths()] if sys.platform.startswith("linux") else []
sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
headers = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")))

setup(
    ext_modules=[
        CppExtension(
            name="torchlns._C",
            sources=sources,
            depends=headers,
            extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", *omp],
            extra_link_args=[*omp, *rpath],
        )
    ],
    cmdclass={"build_ext": IncrementalBuildExtension},
)
