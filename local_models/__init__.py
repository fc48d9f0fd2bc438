"""Local GGUF inference: llama.cpp in one supervised worker process per loaded model.

The public face; ``sidecar`` imports through it. This package imports nothing from
``sidecar``, and importing it loads no native library (llama.cpp is imported by the worker
process, and by :func:`gpu_offload_supported` when called).

    catalog.py        which models exist and what each needs: ``build_catalog`` -> ``Catalog``
                      of ``CatalogEntry`` (``ModelSpec``, GGUF facts, memory estimate)
    gguf.py           GGUF metadata -> ``GGUFInfo``, ``check_supported`` (never tensor data)
    gguf_reader.py    the byte level under it: header, metadata, tensor table, checked
    chat_template.py  the models' chat templates in a sandboxed Jinja environment
    grammar.py        JSON Schema -> GBNF with llama-cpp-python's converter, checked first
                      (``schema_grammar``, ``SchemaError``); llama_cpp imported on first use
    limits.py         pure bounds on one request's work, checked before a worker sees it
    eviction.py       ``plan_load``: pure choice of the idle models to unload for a load
    state.py          ``ModelState``, ``next_state`` (one model's life, pure), ``ModelStatus``
    priority.py       niceness / CPU set / autogroup of worker processes
    protocol.py       the frames between the pool and a worker (``ChatMessage``,
                      ``Sampling``, ``Done``, ...)
    process.py        one worker process seen from the gateway: spawn, handshake, frames,
                      death -> ``WorkerCrashed`` / ``WorkerLost``
    pool.py           ``ModelPool``: load on use, admission, eviction, idle unload, status
    errors.py         every error the pool raises (``LocalError`` and its subclasses)
    worker.py         the worker process itself (``python -m local_models.worker``): frames
                      on stdin/stdout around one ``engine.Engine``
    engine.py         ``Engine``: llama.cpp objects, continuous batching, n choices sharing
                      a prompt, stops (imports llama_cpp only when one is made)
    sampling.py       one sequence's sampler chain, grammar (redraws from a shortlist where
                      exact) and log-probabilities
    slots.py          pure slot bookkeeping: kept tokens, prefix matches, exact (sealed)
                      reuse and its canonical prefill chunks
    embedder.py       embeddings: a second context, one input per turn
    text_cuts.py      pure cuts of text: prompt slices, stop sequences
    backend.py        facts about the installed llama.cpp build
"""

from local_models.backend import gpu_offload_supported
from local_models.catalog import (
    Catalog,
    CatalogEntry,
    CatalogError,
    MemoryEstimate,
    ModelSpec,
    build_catalog,
)
from local_models.errors import (
    InvalidRequest,
    LocalError,
    ModelUnavailable,
    NoRoom,
    Overloaded,
    UnknownModel,
    WorkerCrashed,
    WorkerLost,
)
from local_models.grammar import SchemaError, check_schema, schema_grammar
from local_models.pool import ModelPool, PoolSettings
from local_models.protocol import ChatMessage, Done, Embeddings, Sampling, TokenLogprob, Tokens
from local_models.state import ModelState, ModelStatus

__all__ = [
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "ChatMessage",
    "Done",
    "Embeddings",
    "InvalidRequest",
    "LocalError",
    "MemoryEstimate",
    "ModelPool",
    "ModelSpec",
    "ModelState",
    "ModelStatus",
    "ModelUnavailable",
    "NoRoom",
    "Overloaded",
    "PoolSettings",
    "Sampling",
    "SchemaError",
    "TokenLogprob",
    "Tokens",
    "UnknownModel",
    "WorkerCrashed",
    "WorkerLost",
    "build_catalog",
    "check_schema",
    "gpu_offload_supported",
    "schema_grammar",
]
