"""The chip model's pure parts: formats, exact tables, bit fields, parameter layout, conv geometry.

* ``formats.py``: ``LNSFormat``, ``FP8Format``, ``IntFormat`` (each carries its behaviour; see
  Note: formats carry their behaviour there) and ``MACConfig``;
* ``tables.py``: every exact table a kernel uses, as tuples and cached tensors;
* ``fields.py``: float32 and LNS code bit fields, the integer log, in vectorized PyTorch;
* ``layout.py``: the compact layout of offsets and scales (tensor, channel, block);
* ``geometry.py``: convolution argument normalisation, output sizes, im2col indices;
* ``checks.py``: argument checks shared by every layer above.

Nothing here imports from the rest of torchlns, and nothing here calls an op: every layer
above (the op library, the kernels, the public API) builds on these definitions.
"""
