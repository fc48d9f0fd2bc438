"""Read a GGUF file's metadata without loading its weights: what the file declares.

Contract:

- ``read_gguf(path)`` reads the header, the key/value metadata and the tensor-info table
  (through :mod:`local_models.gguf_reader`, which never reads tensor data and skips large
  metadata arrays) and returns the facts the catalog needs as a :class:`GGUFInfo`.
- Every failure is a ``GGUFError`` whose message starts with the file path: missing, a
  directory, unreadable, bad magic, unsupported version, truncated anywhere (header, metadata,
  tensor infos, tensor data), counts or lengths the file cannot possibly hold (rejected before
  anything is allocated), a tensor table llama.cpp would refuse, a missing
  ``general.architecture``, or a metadata value of the wrong type.
- ``check_supported(info)`` raises ``GGUFError`` when the architecture is not one the bundled
  llama.cpp build can run (``SUPPORTED_ARCHITECTURES``).

Plain ``struct`` on a buffered read; no numpy, no llama.cpp, no I/O at import. Blocking file
I/O: call it from a worker thread when on an event loop. Safe to call concurrently.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Final

import msgspec

from local_models.gguf_reader import GGML_TYPES, Array, GGUFError, Tensor, Value, read_tables

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFError",
    "GGUFInfo",
    "check_supported",
    "read_gguf",
]


class GGUFInfo(msgspec.Struct, frozen=True):
    """What a GGUF file declares about itself (see ``read_gguf``)."""

    path: str
    file_size: int
    architecture: str
    name: str | None
    quantization: str
    context_length: int
    n_params: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    vocab_size: int
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    eot_token_id: int | None
    pooling_type: int | None
    tensor_data_offset: int


# Architecture names from LLM_ARCH_NAMES in vendor/llama.cpp/src/llama-arch.cpp of the
# llama-cpp-python 0.3.36 sdist (the build pyproject.toml pins), minus the "clip" dummy (only
# used by llama-quantize; a clip file cannot be loaded as a model) and "(unknown)".
# fmt: off
SUPPORTED_ARCHITECTURES: Final[frozenset[str]] = frozenset({
    "llama", "llama4", "deci", "falcon", "grok", "gpt2", "gptj", "gptneox", "mpt", "baichuan",
    "starcoder", "refact", "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert",
    "jina-bert-v2", "jina-bert-v3", "eurobert", "bloom", "stablelm", "qwen", "qwen2",
    "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "qwen3next", "qwen3vl", "qwen3vlmoe", "qwen35",
    "qwen35moe", "qwen4exp", "phi2", "phi3", "phimoe", "plamo", "plamo2", "plamo3", "codeshell",
    "orion", "internlm2", "minicpm", "minicpm3", "gemma", "gemma2", "gemma3", "gemma3n",
    "gemma4", "gemma4-assistant", "gemma-embedding", "starcoder2", "mamba", "mamba2", "maple",
    "jamba", "falcon-h1", "xverse", "command-r", "cohere2", "cohere2moe", "dbrx", "olmo",
    "olmo2", "olmoe", "muse-glimmer", "openelm", "arctic", "deepseek", "deepseek2",
    "deepseek2-ocr", "deepseek32", "deepseek4", "chatglm", "glm4", "glm4moe", "glm-dsa",
    "bitnet", "t5", "t5encoder", "jais", "jais2", "nemotron", "nemotron_h", "nemotron_h_moe",
    "exaone", "exaone4", "exaone-moe", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "granite",
    "granitemoe", "granitehybrid", "graniteswitch", "granite_swa", "chameleon",
    "wavtokenizer-dec", "plm", "bailingmoe", "bailingmoe2", "bailingmoe3", "dots1", "dots3note",
    "arcee", "afmoe", "laguna", "ernie4_5", "ernie4_5-moe", "hunyuan-moe", "hunyuan-dense",
    "hunyuan_vl", "hy_v3", "hy_v4", "smollm3", "gpt-oss", "lfm2", "lfm2moe", "dream",
    "smallthinker", "llada", "llada-moe", "seed_oss", "grovemoe", "apertus", "minimax-01",
    "hrm_text", "minimax-m2", "minimax-m3", "cogvlm", "rnd1", "pangu-embedded", "mistral3",
    "eagle3", "dflash", "mistral4", "paddleocr", "mimo2", "step35", "spark2_5", "llama-embed",
    "maincoder", "kimi-linear", "kimi-k3", "glm5-next", "talkie", "mellum", "nanbeige",
    "qwen3tts", "pockettts",
})
# fmt: on

# general.file_type (enum llama_ftype in include/llama.h) -> the name quantizers print.
_FTYPE_NAMES: Final[dict[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}
_FTYPE_GUESSED: Final = 1024


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the metadata of the GGUF file at ``path``; raise ``GGUFError`` if it is unusable.

    Blocking; reads the header, metadata and tensor table only (a few MB at most).
    """
    t = read_tables(path)
    return _build_info(t.path, t.file_size, t.kv, t.tensors, t.data_offset)


def check_supported(info: GGUFInfo) -> None:
    """Raise ``GGUFError`` unless llama.cpp (as bundled) knows ``info.architecture``."""
    if info.architecture in SUPPORTED_ARCHITECTURES:
        return
    known = sorted(SUPPORTED_ARCHITECTURES)
    shown = ", ".join(known[:12])
    raise GGUFError(
        info.path,
        f"unsupported architecture {info.architecture!r} "
        f"(this llama.cpp build knows: {shown}, ... {len(known) - 12} more)",
    )


def _build_info(
    path: str,
    file_size: int,
    kv: dict[str, Value],
    tensors: list[Tensor],
    data_offset: int,
) -> GGUFInfo:
    get = _Getter(path, kv)
    arch = get.string("general.architecture")
    if arch is None:
        raise GGUFError(path, "missing general.architecture")
    n_embd = get.integer(f"{arch}.embedding_length") or 0
    n_head = get.integer(f"{arch}.attention.head_count") or 0
    n_head_kv = get.integer(f"{arch}.attention.head_count_kv")
    head_dim = n_embd // n_head if n_head else 0
    tokens = kv.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, Array) else get.integer(f"{arch}.vocab_size")
    return GGUFInfo(
        path=path,
        file_size=file_size,
        architecture=arch,
        name=get.string("general.name"),
        quantization=_quantization(get.integer("general.file_type"), tensors),
        context_length=get.integer(f"{arch}.context_length") or 0,
        n_params=sum(t.n_elements for t in tensors),
        n_layers=get.integer(f"{arch}.block_count") or 0,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head if n_head_kv is None else n_head_kv,
        head_dim_k=get.integer(f"{arch}.attention.key_length") or head_dim,
        head_dim_v=get.integer(f"{arch}.attention.value_length") or head_dim,
        vocab_size=vocab or 0,
        chat_template=get.string("tokenizer.chat_template"),
        bos_token_id=get.integer("tokenizer.ggml.bos_token_id"),
        eos_token_id=get.integer("tokenizer.ggml.eos_token_id"),
        eot_token_id=get.integer("tokenizer.ggml.eot_token_id"),
        pooling_type=get.integer(f"{arch}.pooling_type"),
        tensor_data_offset=data_offset,
    )


class _Getter:
    """Typed access to metadata; a present key of the wrong type is a ``GGUFError``."""

    def __init__(self, path: str, kv: dict[str, Value]) -> None:
        self._path = path
        self._kv = kv

    def _wrong(self, key: str, value: Value, expected: str) -> GGUFError:
        got = "array" if isinstance(value, Array) else type(value).__name__
        return GGUFError(self._path, f"metadata {key!r} is {got}, expected {expected}")

    def string(self, key: str) -> str | None:
        value = self._kv.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self._wrong(key, value, "a string")

    def integer(self, key: str) -> int | None:
        """An integer, or the largest of an integer array (per-layer values)."""
        value = self._kv.get(key)
        if value is None or type(value) is int:
            return value
        if isinstance(value, Array) and value.values is not None:
            ints = [v for v in value.values if type(v) is int]
            if len(ints) == len(value.values):
                return max(ints, default=0)
        raise self._wrong(key, value, "an integer")


def _quantization(file_type: int | None, tensors: list[Tensor]) -> str:
    if file_type is not None:
        name = _FTYPE_NAMES.get(file_type & ~_FTYPE_GUESSED)
        if name is not None:
            return name
    by_bytes: Counter[int] = Counter()
    for t in tensors:
        by_bytes[t.ggml_type] += t.n_bytes
    if not by_bytes:
        return "unknown"
    return GGML_TYPES[by_bytes.most_common(1)[0][0]][0]
