"""Triton kernels for what Inductor leaves on the table, each a `torch.library` op with a PyTorch reference.

One file per kernel: the Triton code, its registration as a `diffjet::` op that torch.compile and CUDA
graphs can hold, and `reference`, the plain-PyTorch definition the tests hold it to.
"""
