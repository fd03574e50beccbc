"""Autograd of the straight-through estimator ops (QAT and centroid fine-tuning).

# Note: straight-through estimator
The chip ops take codes, which have no gradient. A layer whose float input, float weight
or bias requires grad is therefore wrapped in ``torchlns::ste_linear`` /
``torchlns::ste_conv`` (declared with every other op in library.py): forward returns the
chip's output unchanged (bit for bit), and backward returns the gradients of the float layer
evaluated on the *dequantized* operands, as if encoding were the identity. Only the
operands a gradient reads are decoded: the input's gradient reads the weight, the weight's
reads the input, and the other is a zero-stride stand-in of its shape. The formulas are
registered here with ``torch.library.register_autograd``, so the ops trace under
torch.compile like every other torchlns op. ``functional.py`` is the one place that wraps a
chip output in them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import library  # noqa: F401  (declares the ste_* ops)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.needs = (inputs[3].requires_grad, inputs[4].requires_grad, inputs[5] is not None and inputs[5].requires_grad)
    ctx.conv_args = inputs[6:]


def _linear_backward(ctx, grad):
    x_deq, w_deq = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs
    g2 = grad.reshape(-1, grad.shape[-1])
    gx = (grad @ w_deq).reshape(x_deq.shape) if need_x else None
    gw = g2.T @ x_deq.reshape(-1, x_deq.shape[-1]) if need_w else None
    gb = g2.sum(0) if need_b else None
    return None, None, None, gx, gw, gb


def _conv_backward(ctx, grad):
    x_deq, w_deq = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs
    stride, before, after, dilation, groups = ctx.conv_args
    # 'same' padding may be asymmetric: pad explicitly, then crop the input gradient.
    pad = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
    if need_w:
        xp = F.pad(x_deq, pad)
    else:  # x_deq may be a stand-in (functional._ste_operands): the input's gradient reads its shape only
        xp = x_deq.new_empty([*x_deq.shape[:2], *(s + b + a for s, b, a in zip(x_deq.shape[2:], before, after))])
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, xp, w_deq, [w_deq.shape[0]], stride, [0] * len(stride), dilation, False, [0] * len(stride), groups,
        [need_x, need_w, need_b],
    )
    if gx is not None:
        for d, (b, a) in enumerate(zip(before, after)):
            gx = gx.narrow(2 + d, b, gx.shape[2 + d] - b - a)
    return None, None, None, gx, gw, gb, None, None, None, None, None


torch.library.register_autograd("torchlns::ste_linear", _linear_backward, setup_context=_setup)
torch.library.register_autograd("torchlns::ste_conv", _conv_backward, setup_context=_setup)
