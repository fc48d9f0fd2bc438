"""The local model catalog: which GGUF models exist here, and what each needs to run.

Contract:

- ``build_catalog(specs, scan_dirs)`` returns a ``Catalog``: one ``CatalogEntry`` per configured
  ``ModelSpec`` (in order), then one per ``*.gguf`` file found directly in each scan directory
  (sorted by file name; not recursive). A scanned file is named by its stem, lowercased, with
  every character outside ``[a-z0-9._-]`` replaced by ``-``. Scanned files that a spec already
  names (same resolved path) are left out silently; scanned files whose name is already taken,
  and specs repeating an earlier spec's name, are left out with a warning in
  ``Catalog.warnings``, as are scan directories that do not exist or cannot be listed.
- A model that cannot be used (file missing, corrupt, truncated, an architecture llama.cpp does
  not know, a package that is not installed) still gets an entry, with ``error`` set to a
  one-line message naming the file (or package) and ``memory`` None; ``info`` is kept when the
  file could be read (unsupported architecture). Building the catalog never raises for a bad
  model, so one broken file cannot take the others down.
- ``package_model_path(package)`` finds the GGUF file an installed Python distribution ships,
  from its installed-files record, without importing it.
- ``estimate_memory(info, n_ctx, n_parallel)`` estimates the memory that loading the model
  takes with llama.cpp's defaults: weights + f16 KV cache + compute buffer.

Blocking file I/O (GGUF headers are read, never tensor data); no I/O at import; safe to call
from several threads.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Sequence
from pathlib import Path

import msgspec

from local_models.gguf import GGUFError, GGUFInfo, check_supported, read_gguf
from local_models.protocol import PrefixCache

__all__ = [
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "MemoryEstimate",
    "ModelSpec",
    "build_catalog",
    "estimate_memory",
    "model_name_for_file",
    "package_model_path",
]


class CatalogError(Exception):
    """A model source that cannot be resolved (e.g. a package that is not installed)."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One configured local model: a GGUF ``path`` or an installed ``package`` shipping one."""

    name: str
    path: str | None = None
    package: str | None = None
    n_ctx: int = 4096
    """Context per sequence, in tokens."""
    n_parallel: int = 4
    """Sequences decoded together (the KV cache holds ``n_ctx * n_parallel`` tokens)."""
    n_gpu_layers: int | None = None
    """Layers to offload to a GPU: None offloads what fits when the build has a GPU backend
    (else 0); -1 means all."""
    prefix_cache: PrefixCache = "exact"
    """How a sequence slot's KV cache is reused (:data:`~local_models.protocol.PrefixCache`)."""


class MemoryEstimate(msgspec.Struct, frozen=True):
    """Bytes a loaded model needs: weights, KV cache and llama.cpp's compute buffer."""

    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


class CatalogEntry(msgspec.Struct, frozen=True):
    """A model in the catalog; ``error`` is set (and ``memory`` is None) when the model cannot
    be used. ``info`` is None when the file could not be read."""

    name: str
    path: str
    """The GGUF file (resolved from the package for package specs; "" if it was not found)."""
    spec: ModelSpec
    info: GGUFInfo | None = None
    error: str | None = None
    memory: MemoryEstimate | None = None

    @property
    def usable(self) -> bool:
        return self.error is None


class Catalog(msgspec.Struct, frozen=True):
    """The result of ``build_catalog``: entries in order, and what was skipped and why."""

    entries: list[CatalogEntry]
    warnings: list[str]

    def get(self, name: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.name == name), None)


# --- memory -------------------------------------------------------------------------------

_KV_BYTES_PER_VALUE = 2  # llama.cpp's default cache type is f16
_N_UBATCH = 512  # llama.cpp's default n_batch/n_ubatch: the widest graph it reserves for
_FLOAT_BYTES = 4
_KV_PAD = 256  # llama.cpp rounds each sequence's context up to a multiple of 256 cells
_ACTIVATION_ROWS = 4  # n_embd-wide f32 activations live at the graph's peak (calibrated)


def estimate_memory(
    info: GGUFInfo, n_ctx: int, n_parallel: int, *, flash_attn: bool = False
) -> MemoryEstimate:
    """Estimate the bytes llama.cpp needs to run ``info`` with ``n_parallel`` sequences of
    ``n_ctx`` tokens each, in one context of ``n_ctx * n_parallel`` cells with llama.cpp's
    defaults otherwise (f16 KV cache, one KV stream per sequence, n_batch/n_ubatch 512).
    Flash attention is assumed off unless ``flash_attn``: that is llama-cpp-python's ``Llama``
    default and the larger compute buffer, so the estimate is an upper bound for contexts
    created with llama.cpp's own default (auto, which turns it on for the CPU backend).

    - weights: the file's tensor data, which llama.cpp maps or copies as is.
    - kv_cache: K and V for every layer and every cell, f16:
      ``n_layers * cells * n_head_kv * (head_dim_k + head_dim_v) * 2``, where
      ``cells = n_parallel * n_ctx`` (each sequence's ``n_ctx`` rounded up to 256 cells, as
      llama.cpp does).
    - compute: the worst-case graph llama.cpp reserves for one batch (``_compute_bytes``).

    Pure arithmetic on the metadata: no I/O.
    """
    n_ctx_seq = _pad(max(n_ctx, 1), _KV_PAD)
    cells = n_ctx_seq * max(n_parallel, 1)
    kv = (
        info.n_layers
        * cells
        * info.n_head_kv
        * (info.head_dim_k + info.head_dim_v)
        * _KV_BYTES_PER_VALUE
    )
    weights = max(info.file_size - info.tensor_data_offset, 0)
    compute = _compute_bytes(info, n_ctx_seq, min(_N_UBATCH, cells), flash_attn)
    return MemoryEstimate(weights=weights, kv_cache=kv, compute=compute)


def _compute_bytes(info: GGUFInfo, n_kv: int, n_tokens: int, flash_attn: bool) -> int:
    """llama.cpp's CPU compute buffer for its worst-case batch of ``n_tokens`` against a KV
    stream of ``n_kv`` cells.

    The peak of the reserved graph is the larger of two f32 tensors: the logits of every
    token of the batch (``n_vocab * n_tokens``), or, without flash attention, one layer's
    attention scores and mask (``(n_head + 1) * n_kv * n_tokens``); plus a few n_embd-wide
    activations per token. Calibrated on the sizes llama.cpp 0.3.36 logs ("compute buffer
    size") for SmolLM2-135M (n_ctx 256 to 12288, 1 to 4 sequences): within 3% of each.
    """
    logits = info.vocab_size * n_tokens
    scores = 0 if flash_attn else (info.n_head + 1) * n_kv * n_tokens
    activations = _ACTIVATION_ROWS * info.n_embd * n_tokens
    return (max(logits, scores) + activations) * _FLOAT_BYTES


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- sources ------------------------------------------------------------------------------


def package_model_path(package: str) -> Path:
    """The first ``*.gguf`` file (sorted by its path in the distribution) that the installed
    distribution ``package`` ships. The package is never imported.

    Raises ``CatalogError`` naming the package when it is not installed, has no record of its
    files, or ships no GGUF file.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CatalogError(f"package {package!r} is not installed") from None
    files = dist.files
    if files is None:
        raise CatalogError(f"package {package!r} has no record of its installed files")
    ggufs = sorted((f for f in files if f.name.lower().endswith(".gguf")), key=str)
    if not ggufs:
        raise CatalogError(f"package {package!r} ships no .gguf file")
    return Path(str(dist.locate_file(ggufs[0])))


_NAME_UNSAFE = re.compile(r"[^a-z0-9._-]")


def model_name_for_file(path: str | os.PathLike[str]) -> str:
    """The catalog name of a scanned file: its stem, lowercased, unsafe characters as '-'."""
    return _NAME_UNSAFE.sub("-", Path(path).stem.lower())


# --- building -----------------------------------------------------------------------------


def build_catalog(
    specs: Sequence[ModelSpec] = (),
    scan_dirs: Sequence[str | os.PathLike[str]] = (),
    *,
    n_ctx: int = 4096,
    n_parallel: int = 4,
    n_gpu_layers: int | None = None,
) -> Catalog:
    """Catalog the configured ``specs``, then the ``*.gguf`` files in ``scan_dirs``.

    Scanned files get a ``ModelSpec`` with the keyword defaults (``n_ctx``, ``n_parallel``,
    ``n_gpu_layers``). Never raises for a bad model or directory; see the module docstring.
    """
    entries: list[CatalogEntry] = []
    warnings: list[str] = []
    names: set[str] = set()
    seen_files: set[str] = set()
    for spec in specs:
        if spec.name in names:
            warnings.append(f"model {spec.name!r} is configured twice; the second is ignored")
            continue
        entry = _entry_for_spec(spec)
        names.add(spec.name)
        if entry.path:
            seen_files.add(os.path.realpath(entry.path))
        entries.append(entry)
    for directory in scan_dirs:
        for file in _gguf_files(directory, warnings):
            real = os.path.realpath(file)
            if real in seen_files:
                continue
            seen_files.add(real)
            name = model_name_for_file(file)
            if name in names:
                warnings.append(f"{file}: skipped, the model name {name!r} is already taken")
                continue
            spec = ModelSpec(
                name=name,
                path=str(file),
                n_ctx=n_ctx,
                n_parallel=n_parallel,
                n_gpu_layers=n_gpu_layers,
            )
            names.add(name)
            entries.append(_entry_for_file(spec, str(file)))
    return Catalog(entries=entries, warnings=warnings)


def _gguf_files(directory: str | os.PathLike[str], warnings: list[str]) -> list[Path]:
    root = Path(directory)
    try:
        children = sorted(root.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        warnings.append(f"{root}: model directory does not exist")
        return []
    except NotADirectoryError:
        warnings.append(f"{root}: not a directory")
        return []
    except OSError as e:
        warnings.append(f"{root}: cannot list model directory: {e.strerror or e}")
        return []
    return [p for p in children if p.suffix.lower() == ".gguf" and p.is_file()]


def _entry_for_spec(spec: ModelSpec) -> CatalogEntry:
    if (spec.path is None) == (spec.package is None):
        error = f"model {spec.name!r}: set exactly one of path or package"
        return CatalogEntry(spec.name, "", spec, error=error)
    if spec.path is not None:
        return _entry_for_file(spec, os.path.expanduser(spec.path))
    try:
        path = package_model_path(spec.package or "")
    except CatalogError as e:
        return CatalogEntry(spec.name, "", spec, error=f"model {spec.name!r}: {e}")
    return _entry_for_file(spec, str(path))


def _entry_for_file(spec: ModelSpec, path: str) -> CatalogEntry:
    try:
        info = read_gguf(path)
    except GGUFError as e:
        return CatalogEntry(spec.name, path, spec, error=str(e))
    try:
        check_supported(info)
    except GGUFError as e:  # keep what was read: listings still show the architecture
        return CatalogEntry(spec.name, path, spec, info=info, error=str(e))
    # The worker never gives a sequence more context than the model was trained for.
    n_ctx = min(spec.n_ctx, info.context_length) if info.context_length else spec.n_ctx
    memory = estimate_memory(info, n_ctx, spec.n_parallel)
    return CatalogEntry(spec.name, path, spec, info=info, memory=memory)
