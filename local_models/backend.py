"""Facts about the installed llama.cpp build (loads its shared library on first call)."""

from __future__ import annotations

import functools


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can offload layers to a GPU (CUDA, Metal...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())
