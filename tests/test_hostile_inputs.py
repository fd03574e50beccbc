"""Careless calls get a clear error naming the problem, never a crash deep in a kernel (issue 14)."""

import pytest
import torch

import torchlns
from torchlns import LNS8

CONVS = [  # (function, input shape, weight shape)
    (torchlns.lns_conv1d, (1, 4, 9), (4, 4, 3)),
    (torchlns.lns_conv2d, (1, 4, 9, 9), (4, 4, 3, 3)),
    (torchlns.lns_conv3d, (1, 4, 5, 5, 5), (4, 4, 3, 3, 3)),
    (torchlns.lns_conv_transpose1d, (1, 4, 9), (4, 4, 3)),
    (torchlns.lns_conv_transpose2d, (1, 4, 9, 9), (4, 4, 3, 3)),
    (torchlns.lns_conv_transpose3d, (1, 4, 5, 5, 5), (4, 4, 3, 3, 3)),
]


@pytest.mark.parametrize("fn,xs,ws", CONVS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("kw,name", [(dict(stride=0), "stride"), (dict(stride=-1), "stride"),
                                     (dict(dilation=0), "dilation"), (dict(padding=-1), "padding"),
                                     (dict(groups=0), "groups"), (dict(groups=3), "groups")], ids=str)
def test_conv_geometry_is_validated_up_front(fn, xs, ws, kw, name):
    x = torchlns.LNSTensor.from_float(torch.randn(xs), LNS8)
    w = torchlns.LNSTensor.from_float(torch.randn(ws), LNS8)
    with pytest.raises(ValueError, match=name):
        fn(x, w, **kw)
