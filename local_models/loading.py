"""Loading a model into llama.cpp for the engine: weights, the batch context, metadata, logs.

Called on the engine's thread (:mod:`local_models.engine`) with the ``llama_cpp`` module it
imported; nothing here imports llama_cpp itself.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

from local_models import protocol as p

__all__ = ["LoadError", "load_model", "meta", "quiet_logs"]


class LoadError(Exception):
    """The model cannot be loaded; ``str(err)`` names the file and why."""


def load_model(ll: Any, load: p.Load, *, n_batch: int,
               gpu_offload: bool) -> tuple[Any, Any, int]:
    """Load the weights and create the batch context; returns (model, context, layers
    offloaded). With a GPU build and no n_gpu_layers, offload what fits: all layers
    first, then fewer, then none, until both the weights and the context fit."""
    if not gpu_offload:
        candidates = [0]
    elif load.n_gpu_layers is not None:
        candidates = [load.n_gpu_layers]
    else:
        n = max(load.n_layers, 1)
        candidates = [-1, *sorted({n * 3 // 4, n // 2, n // 4} - {0}, reverse=True), 0]
    why = "llama.cpp could not load the model"
    for layers in candidates:
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = layers
        model = ll.llama_model_load_from_file(load.path.encode(), mparams)
        if not model:
            continue
        n_ctx_seq = min(load.n_ctx, ll.llama_model_n_ctx_train(model) or load.n_ctx)
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx_seq * load.n_parallel
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = load.n_parallel
        params.n_threads = params.n_threads_batch = load.n_threads
        params.kv_unified = False  # one KV stream per sequence, n_ctx_seq cells each
        params.no_perf = True
        ctx = ll.llama_init_from_model(model, params)
        if ctx:
            total = ll.llama_model_n_layer(model)
            return model, ctx, total if layers < 0 else min(layers, total)
        ll.llama_model_free(model)
        why = (f"llama.cpp could not create a context of {params.n_ctx} tokens "
               f"({load.n_parallel} x {n_ctx_seq}); lower n_ctx or n_parallel")
    raise LoadError(f"{load.path}: {why}")


def meta(ll: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return bytes(buf.value).decode("utf-8", errors="replace")


def quiet_logs(ll: Any) -> Any:
    """Route llama.cpp's log to stderr, errors only unless SIDECAR_LLAMA_LOG=1."""
    verbose = os.environ.get("SIDECAR_LLAMA_LOG") == "1"

    last = [0]

    @ll.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous message
            last[0] = level
        if verbose or last[0] >= 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    ll.llama_log_set(callback, None)
    return callback
