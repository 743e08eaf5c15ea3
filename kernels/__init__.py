"""Triton kernels, installed as ``fastjepa.kernels`` (``fastjepa/kernels`` links here).

One module per op; each is launched only through its op in ``fastjepa/ops/``, which
validates the inputs (the kernels trust them: out-of-range reads are silent on the GPU
and in the interpreter).
"""
