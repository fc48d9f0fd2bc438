"""Read a GGUF file's metadata without loading its weights.

Contract:

- ``read_gguf(path)`` opens the file once and reads only the header, the key/value metadata and
  the tensor-info table (little-endian GGUF v2 and v3). Tensor data is never read: the reader
  only checks that the file is long enough to hold every tensor the table declares. Large
  metadata arrays (the tokenizer's tokens, scores, merges, token types: hundreds of thousands of
  entries) are skipped, not decoded; only their lengths are kept.
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
import struct
from collections import Counter
from typing import BinaryIO, Final, TypeAlias

import msgspec

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFError",
    "GGUFInfo",
    "check_supported",
    "read_gguf",
]


class GGUFError(Exception):
    """A GGUF file that cannot be read or used; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[GGUFError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


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

# ggml_type -> (name, elements per block, bytes per block), from ggml/include/ggml.h and the
# type_traits table in ggml/src/ggml.c (block structs in ggml-common.h) of the same sources.
# Numbers missing here were removed from ggml (4, 5, 31-33, 36-38).
_GGML_TYPES: Final[dict[int, tuple[str, int, int]]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

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

_MAGIC: Final = b"GGUF"
_VERSIONS: Final = (2, 3)
_DEFAULT_ALIGNMENT: Final = 32
_MAX_DIMS: Final = 4
_MAX_TENSOR_NAME: Final = 63  # GGML_MAX_NAME (64) including the NUL
_CHUNK: Final = 1 << 20
# Numeric arrays up to this length are decoded (per-layer values such as head_count_kv);
# longer ones (token scores, token types) are only skipped.
_MAX_DECODED_ARRAY: Final = 4096
# Smallest possible encodings, used to reject absurd counts before looping over them.
_MIN_KV_BYTES: Final = 8 + 1 + 4 + 1  # key length, 1-byte key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES: Final = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# gguf_type -> struct format of one scalar (STRING = 8 and ARRAY = 9 are handled apart).
_T_STRING: Final = 8
_T_ARRAY: Final = 9
_SCALARS: Final[dict[int, struct.Struct]] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_TYPE_NAMES: Final[dict[int, str]] = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_INT64_MAX: Final = (1 << 63) - 1


class _Array(msgspec.Struct, frozen=True):
    """A metadata array: its element type, length, and values when short and numeric."""

    elem_type: int
    length: int
    values: tuple[int | float | bool, ...] | None


_Value: TypeAlias = int | float | bool | str | _Array


class _Tensor(msgspec.Struct, frozen=True):
    name: str
    ggml_type: int
    n_elements: int
    n_bytes: int
    offset: int


class _Cursor:
    """Sequential little-endian reads over a file, through one reusable chunk buffer.

    Every read checks the file's length first, so a declared length that the file cannot hold
    fails before anything is allocated.
    """

    def __init__(self, f: BinaryIO, path: str, file_size: int) -> None:
        self._f = f
        self._path = path
        self.file_size = file_size
        self._buf = b""
        self._pos = 0  # position in _buf
        self._base = 0  # file offset of _buf[0]
        self.section = "header"  # named in truncation errors

    def tell(self) -> int:
        return self._base + self._pos

    def remaining(self) -> int:
        return self.file_size - self.tell()

    def truncated(self) -> GGUFError:
        return GGUFError(self._path, f"truncated file: {self.section} runs past the end")

    def _ensure(self, n: int) -> None:
        avail = len(self._buf) - self._pos
        if avail >= n:
            return
        if n > self.remaining():
            raise self.truncated()
        chunk = self._f.read(max(n - avail, _CHUNK))
        self._buf = self._buf[self._pos :] + chunk
        self._base += self._pos
        self._pos = 0
        if len(self._buf) < n:  # the file shrank while we read it
            raise self.truncated()

    def unpack(self, fmt: struct.Struct) -> tuple[int | float | bool, ...]:
        self._ensure(fmt.size)
        values = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return values

    def u32(self) -> int:
        self._ensure(4)
        (value,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return int(value)

    def u64(self) -> int:
        self._ensure(8)
        (value,) = _U64.unpack_from(self._buf, self._pos)
        self._pos += 8
        return int(value)

    def raw(self, n: int) -> bytes:
        self._ensure(n)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def string(self) -> str:
        return self.raw(self.u64()).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n <= len(self._buf) - self._pos:
            self._pos += n
            return
        if n > self.remaining():
            raise self.truncated()
        target = self.tell() + n
        self._f.seek(target)
        self._buf, self._pos, self._base = b"", 0, target

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings (the hot loop for tokenizer vocabularies)."""
        if count * 8 > self.remaining():
            raise self.truncated()
        unpack_from = _U64.unpack_from
        while count:
            buf, pos = self._buf, self._pos
            end = len(buf)
            # Fast path: strings wholly inside the current chunk.
            while count and pos + 8 <= end:
                (n,) = unpack_from(buf, pos)
                if pos + 8 + n > end:
                    break
                pos += 8 + n
                count -= 1
            self._pos = pos
            if count:  # a string straddles the chunk boundary
                self.skip(self.u64())
                count -= 1


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the metadata of the GGUF file at ``path``; raise ``GGUFError`` if it is unusable.

    Blocking; reads the header, metadata and tensor table only (a few MB at most).
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            cur = _Cursor(f, spath, file_size)
            _read_header_magic(cur, spath)
            n_tensors, n_kv = _read_counts(cur, spath)
            cur.section = "metadata"
            kv = _read_kv(cur, spath, n_kv)
            alignment = _alignment(kv, spath)
            cur.section = "tensor info table"
            tensors = _read_tensor_infos(cur, spath, n_tensors)
    except IsADirectoryError:
        raise GGUFError(spath, "is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise GGUFError(spath, "no such file") from None
    except OSError as e:
        raise GGUFError(spath, f"cannot read: {e.strerror or e}") from None
    data_offset = _aligned(cur.tell(), alignment) if tensors else cur.tell()
    _check_tensor_layout(spath, tensors, alignment, data_offset, file_size)
    return _build_info(spath, file_size, kv, tensors, data_offset)


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


def _read_header_magic(cur: _Cursor, path: str) -> None:
    if cur.file_size < len(_MAGIC) or cur.raw(len(_MAGIC)) != _MAGIC:
        raise GGUFError(path, "not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in _VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in _VERSIONS:
            raise GGUFError(path, "big-endian GGUF files are not supported")
        raise GGUFError(path, f"unsupported GGUF version {version} (supported: 2, 3)")


def _read_counts(cur: _Cursor, path: str) -> tuple[int, int]:
    n_tensors = cur.u64()
    n_kv = cur.u64()
    # Every entry takes some bytes, so a count the rest of the file cannot hold is corrupt;
    # rejecting it here keeps a garbage header from driving a huge loop or allocation.
    room = cur.remaining()
    for count, what, size in (
        (n_kv, "metadata entries", _MIN_KV_BYTES),
        (n_tensors, "tensors", _MIN_TENSOR_INFO_BYTES),
    ):
        if count > room // size:
            raise GGUFError(
                path,
                f"truncated or corrupt file: {count} {what} cannot fit in "
                f"the {cur.file_size}-byte file",
            )
    return n_tensors, n_kv


def _read_kv(cur: _Cursor, path: str, n_kv: int) -> dict[str, _Value]:
    kv: dict[str, _Value] = {}
    for _ in range(n_kv):
        key = cur.string()
        if not key:
            raise GGUFError(path, "corrupt metadata: empty key")
        if key in kv:
            raise GGUFError(path, f"corrupt metadata: duplicate key {key!r}")
        cur.section = f"metadata value {key!r}"
        kv[key] = _read_value(cur, path, key, cur.u32())
        cur.section = "metadata"
    return kv


def _read_value(cur: _Cursor, path: str, key: str, vtype: int) -> _Value:
    if vtype == _T_STRING:
        return cur.string()
    if vtype == _T_ARRAY:
        return _read_array(cur, path, key)
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise GGUFError(path, f"corrupt metadata: key {key!r} has invalid type {vtype}")
    return cur.unpack(fmt)[0]


def _read_array(cur: _Cursor, path: str, key: str) -> _Array:
    elem_type = cur.u32()
    length = cur.u64()
    if elem_type == _T_STRING:
        cur.skip_strings(length)
        return _Array(elem_type, length, None)
    fmt = _SCALARS.get(elem_type)
    if fmt is None:  # llama.cpp refuses nested arrays too
        raise GGUFError(path, f"corrupt metadata: key {key!r} is an array of invalid type")
    n_bytes = length * fmt.size
    if length > _MAX_DECODED_ARRAY:
        cur.skip(n_bytes)
        return _Array(elem_type, length, None)
    many = struct.Struct(f"<{length}{fmt.format[1:]}")
    return _Array(elem_type, length, cur.unpack(many))


def _alignment(kv: dict[str, _Value], path: str) -> int:
    value = kv.get("general.alignment", _DEFAULT_ALIGNMENT)
    if type(value) is not int or value <= 0 or value & (value - 1):
        raise GGUFError(path, f"corrupt metadata: general.alignment {value!r} is not a power of 2")
    return value


def _read_tensor_infos(cur: _Cursor, path: str, n_tensors: int) -> list[_Tensor]:
    tensors: list[_Tensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string()
        if len(name.encode()) > _MAX_TENSOR_NAME or name in seen:
            raise GGUFError(path, f"corrupt tensor table: bad or duplicate name for tensor {i}")
        seen.add(name)
        tensors.append(_read_tensor_info(cur, path, name))
    return tensors


def _read_tensor_info(cur: _Cursor, path: str, name: str) -> _Tensor:
    n_dims = cur.u32()
    if n_dims > _MAX_DIMS:
        raise GGUFError(path, f"corrupt tensor table: tensor {name!r} has {n_dims} dimensions")
    dims = [cur.u64() for _ in range(n_dims)]
    ggml_type = cur.u32()
    offset = cur.u64()
    n_elements = 1
    for d in dims:
        n_elements *= d
    if any(d > _INT64_MAX for d in dims) or n_elements > _INT64_MAX:
        raise GGUFError(path, f"corrupt tensor table: tensor {name!r} has shape {dims}")
    traits = _GGML_TYPES.get(ggml_type)
    if traits is None:
        raise GGUFError(path, f"tensor {name!r} has unknown ggml type {ggml_type}")
    type_name, block, type_size = traits
    if dims and dims[0] % block:
        raise GGUFError(
            path, f"tensor {name!r}: row of {dims[0]} is not a multiple of {type_name} blocks"
        )
    return _Tensor(name, ggml_type, n_elements, n_elements // block * type_size, offset)


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_tensor_layout(
    path: str, tensors: list[_Tensor], alignment: int, data_offset: int, file_size: int
) -> None:
    """Tensors must sit back to back, each padded to ``alignment`` (as llama.cpp requires),
    and the last one must end inside the file."""
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise GGUFError(
                path,
                f"corrupt tensor table: tensor {t.name!r} at offset {t.offset}, "
                f"expected {expected}",
            )
        expected = _aligned(t.offset + t.n_bytes, alignment)
    end = max((data_offset + t.offset + t.n_bytes for t in tensors), default=data_offset)
    if end > file_size:
        raise GGUFError(
            path,
            f"truncated file: tensor data needs {end} bytes, the file has {file_size}",
        )


def _build_info(
    path: str,
    file_size: int,
    kv: dict[str, _Value],
    tensors: list[_Tensor],
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
    vocab = tokens.length if isinstance(tokens, _Array) else get.integer(f"{arch}.vocab_size")
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

    def __init__(self, path: str, kv: dict[str, _Value]) -> None:
        self._path = path
        self._kv = kv

    def _wrong(self, key: str, value: _Value, expected: str) -> GGUFError:
        got = "array" if isinstance(value, _Array) else type(value).__name__
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
        if isinstance(value, _Array) and value.values is not None:
            ints = [v for v in value.values if type(v) is int]
            if len(ints) == len(value.values):
                return max(ints, default=0)
        raise self._wrong(key, value, "an integer")


def _quantization(file_type: int | None, tensors: list[_Tensor]) -> str:
    if file_type is not None:
        name = _FTYPE_NAMES.get(file_type & ~_FTYPE_GUESSED)
        if name is not None:
            return name
    by_bytes: Counter[int] = Counter()
    for t in tensors:
        by_bytes[t.ggml_type] += t.n_bytes
    if not by_bytes:
        return "unknown"
    return _GGML_TYPES[by_bytes.most_common(1)[0][0]][0]
