"""Build-time tools run from the repository root (not installed with the package).

``python -m tools.aot``: ahead-of-time compilation of the Triton kernels for sm_80/sm_90
without a GPU (registers, spills, shared memory, tensor-core and int64-addressing checks).
"""
