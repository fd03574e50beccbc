"""The ``torchlns::`` operator library: every schema, its reference and fake kernels.

# Note: op registration
* Every schema lives here, in ``SCHEMAS``, and nowhere else. Ops take the format as plain
  fields and its exact tables as tensors (see Note: exact tables in core/tables.py), so
  every backend computes the same function of the same inputs.
* The pure-PyTorch reference (reference.py) is registered as the
  ``CompositeExplicitAutograd`` kernel: the fallback for every device. A backend kernel
  overrides it where one exists: C++ for ``CPU`` (csrc/, registered when backend.py loads
  ``torchlns._C``) and Triton for ``CUDA`` (triton_kernels.py, registered when a GPU and
  Triton are present). The FP8/INT MAC (``scaled_mm``/``scaled_conv``) is one float32
  product of exact values on every device: cuBLAS/cuDNN on CUDA (dense.py).
* Fake kernels give shapes and dtypes for torch.compile and meta tensors.
* The codec and MAC ops take and return codes and integers, which have no gradient. The
  straight-through estimator is two more ops, ``ste_linear``/``ste_conv``, whose forward is
  the identity on the chip's output and whose autograd formula is registered in autograd.py.
* Argument checking (offset ranges, code ranges, accumulator overflow) happens in the
  public Python functions before an op runs, so kernels see valid inputs only.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..core.geometry import conv_output_size
from . import reference

LIB = torch.library.Library("torchlns", "DEF")

SCHEMAS = {
    "lns_encode": "lns_encode(Tensor x, Tensor offset, Tensor buckets, int bits, int frac_bits, bool mitchell) -> Tensor",
    "lns_decode": "lns_decode(Tensor codes, Tensor offset, Tensor decode_bits, int bits, int frac_bits) -> Tensor",
    "fp8_encode": "fp8_encode(Tensor x, Tensor scale, int man_bits, int bias, int max_code, bool has_inf) -> Tensor",
    "fp8_decode": "fp8_decode(Tensor codes, Tensor scale, Tensor values) -> Tensor",
    "int_encode": "int_encode(Tensor x, Tensor scale, int qmax, int bits) -> Tensor",
    "int_decode": "int_decode(Tensor codes, Tensor scale) -> Tensor",
    # overflow, chunk, chunk_bits: the fixed accumulator's wrap-around and two-stage designs (see
    # Note: overflow and chunks in ops/reference.py); a convolution with them runs as im2col
    # columns and this op (see Note: two-stage MACs in functional.py).
    "lns_mm": (
        "lns_mm(Tensor x, Tensor x_offset, Tensor w, Tensor w_offset, Tensor table, Tensor? bias, int x_bits, "
        "int w_bits, int frac_bits, bool fixed, int acc_bits, int acc_lsb, str overflow=\"saturate\", int chunk=0, "
        "int chunk_bits=0) -> Tensor"
    ),
    # 2-D (4-D codes) or 3-D (5-D codes). Reference: im2col + lns_mm per group (3-D: the depth
    # taps stacked as channels first); CPU: the direct kernels (C++); CUDA: an implicit GEMM.
    # x_block > 0: dynamic per-block activations (see Note: dynamic blocks in ops/reference.py);
    # x holds wide codes, blocks of x_block elements of each receptive field are encoded as
    # x_block_bits codes.
    "lns_conv": (
        "lns_conv(Tensor x, Tensor x_offset, Tensor w, Tensor w_offset, Tensor table, Tensor? bias, int x_bits, "
        "int w_bits, int frac_bits, bool fixed, int acc_bits, int acc_lsb, int[] stride, int[] pad_before, "
        "int[] pad_after, int[] dilation, int groups, int x_block=0, int x_block_bits=0) -> Tensor"
    ),
    # The FP8/INT comparison MAC of spec section 5: matrix products of exact values.
    "scaled_mm": (
        "scaled_mm(Tensor x, Tensor x_scale, Tensor? x_values, Tensor w, Tensor w_scale, Tensor? w_values, "
        "Tensor? bias, int x_block, int w_block) -> Tensor"
    ),
    # Its convolution: a per-tensor input scale, per-tensor or per-channel weight scales.
    "scaled_conv": (
        "scaled_conv(Tensor x, Tensor x_scale, Tensor? x_values, Tensor w, Tensor w_scale, Tensor? w_values, "
        "Tensor? bias, int[] stride, int[] pad_before, int[] pad_after, int[] dilation, int groups) -> Tensor"
    ),
    "ste_linear": "ste_linear(Tensor y, Tensor x_deq, Tensor w_deq, Tensor x, Tensor w, Tensor? bias) -> Tensor",
    "ste_conv": (
        "ste_conv(Tensor y, Tensor x_deq, Tensor w_deq, Tensor x, Tensor w, Tensor? bias, int[] stride, "
        "int[] pad_before, int[] pad_after, int[] dilation, int groups) -> Tensor"
    ),
}


def _ste_identity(y, *args):
    return y.clone()


REFERENCE = {
    "lns_encode": reference.lns_encode_reference,
    "lns_decode": reference.lns_decode_reference,
    "fp8_encode": reference.fp8_encode_reference,
    "fp8_decode": reference.fp8_decode_reference,
    "int_encode": reference.int_encode_reference,
    "int_decode": reference.int_decode_reference,
    "lns_mm": reference.lns_mm_reference,
    "lns_conv": reference.lns_conv_reference,
    "scaled_mm": reference.scaled_mm_reference,
    "scaled_conv": reference.scaled_conv_reference,
    "ste_linear": _ste_identity,
    "ste_conv": _ste_identity,
}

# The ops that have backend kernels (C++ for CPU, Triton for CUDA); the others are composite everywhere.
KERNEL_OPS = ("lns_encode", "lns_decode", "fp8_encode", "fp8_decode", "int_encode", "int_decode", "lns_mm", "lns_conv",
              "scaled_mm", "scaled_conv")

for _name, _schema in SCHEMAS.items():
    LIB.define(_schema)
    LIB.impl(_name, REFERENCE[_name], "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------------------
# fake kernels
# ----------------------------------------------------------------------------------------
def _shape_of(data: torch.Tensor, *params: torch.Tensor) -> torch.Size:
    return torch.broadcast_shapes(data.shape, *(p.shape for p in params))


@torch.library.register_fake("torchlns::lns_encode")
def _(x, offset, buckets, bits, frac_bits, mitchell):
    return x.new_empty(_shape_of(x, offset), dtype=torch.uint8 if bits <= 8 else torch.int16)


@torch.library.register_fake("torchlns::lns_decode")
def _(codes, offset, decode_bits, bits, frac_bits):
    return codes.new_empty(_shape_of(codes, offset), dtype=torch.float32)


@torch.library.register_fake("torchlns::fp8_encode")
def _(x, scale, man_bits, bias, max_code, has_inf):
    return x.new_empty(_shape_of(x, scale), dtype=torch.uint8)


@torch.library.register_fake("torchlns::fp8_decode")
def _(codes, scale, values):
    return codes.new_empty(_shape_of(codes, scale), dtype=torch.float32)


@torch.library.register_fake("torchlns::int_encode")
def _(x, scale, qmax, bits):
    return x.new_empty(_shape_of(x, scale), dtype=torch.int8 if bits <= 8 else torch.int16)


@torch.library.register_fake("torchlns::int_decode")
def _(codes, scale):
    return codes.new_empty(_shape_of(codes, scale), dtype=torch.float32)


@torch.library.register_fake("torchlns::lns_mm")
def _(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb, overflow="saturate",
      chunk=0, chunk_bits=0):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "lns_mm takes (M, K) and (N, K) codes")
    torch._check(x.shape[1] == w.shape[1], lambda: "lns_mm: reduction sizes differ")
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("torchlns::lns_conv")
def _(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb, stride, pad_before,
      pad_after, dilation, groups, x_block=0, x_block_bits=0):
    torch._check(x.dim() in (4, 5) and w.dim() == x.dim(),
                 lambda: "lns_conv takes (N, C, [D,] H, W) and (Cout, C/groups, [kd,] kh, kw) codes")
    sizes = [conv_output_size(x.shape[2 + d], w.shape[2 + d], stride[d], pad_before[d], pad_after[d], dilation[d])
             for d in range(x.dim() - 2)]
    return x.new_empty((x.shape[0], w.shape[0], *sizes), dtype=torch.float32)


@torch.library.register_fake("torchlns::scaled_mm")
def _(x, x_scale, x_values, w, w_scale, w_values, bias, x_block, w_block):
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "scaled_mm takes (M, K) and (N, K) codes")
    torch._check(x.shape[1] == w.shape[1], lambda: "scaled_mm: reduction sizes differ")
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.register_fake("torchlns::scaled_conv")
def _(x, x_scale, x_values, w, w_scale, w_values, bias, stride, pad_before, pad_after, dilation, groups):
    torch._check(x.dim() == 4 and w.dim() == 4, lambda: "scaled_conv takes (N, C, H, W) and (Cout, C/groups, kh, kw) codes")
    sizes = [conv_output_size(x.shape[2 + d], w.shape[2 + d], stride[d], pad_before[d], pad_after[d], dilation[d])
             for d in range(2)]
    return x.new_empty((x.shape[0], w.shape[0], *sizes), dtype=torch.float32)


for _name in ("ste_linear", "ste_conv"):
    torch.library.register_fake(f"torchlns::{_name}", lambda y, *args: torch.empty_like(y))


# ----------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------
def _dense_kernels() -> dict:
    """The FP8/INT MAC as float32 products: CUDA's kernels for it, with or without Triton."""
    from . import dense

    return {"scaled_mm": dense.scaled_mm_dense, "scaled_conv": dense.scaled_conv_dense}


def _cuda_kernels() -> dict:
    """Every kernel CUDA runs: the Triton ones and the dense FP8/INT MAC."""
    from . import triton_kernels

    return {**triton_kernels.KERNELS, **_dense_kernels()}


def register_triton() -> str | None:
    """Register the CUDA kernels (Triton, and the dense FP8/INT MAC); returns why Triton's are not, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        kernels, error = _cuda_kernels(), None
    except ImportError as e:  # triton missing or broken: the reference serves the LNS ops
        kernels, error = _dense_kernels(), f"{type(e).__name__}: {e}"
    for name, kernel in kernels.items():
        LIB.impl(name, kernel, "CUDA")
    return error


TRITON_ERROR = register_triton()


@contextlib.contextmanager
def cuda_kernels_on_cpu():
    """Run every torchlns op on CPU tensors through the kernels CUDA uses (Triton, dense) inside the block.

    With ``TRITON_INTERPRET=1`` set before torchlns is imported, this runs the GPU path of a
    whole model on a machine without a GPU: how CI tests it. The CPU kernels come back on exit.
    """
    kernels = _cuda_kernels()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        with torch.library._scoped_library("torchlns", "IMPL") as lib:
            for name, kernel in kernels.items():
                lib.impl(name, kernel, "CPU")
            yield


@contextlib.contextmanager
def reference_kernels():
    """Run every torchlns op on its pure-PyTorch reference inside the block, on every device.

    For debugging a kernel against its oracle and for benchmarks that compare the two; the
    native kernels come back on exit.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        with torch.library._scoped_library("torchlns", "IMPL") as lib:
            for name in KERNEL_OPS:
                for key in ("CPU", "CUDA"):
                    lib.impl(name, REFERENCE[name], key)
            yield
