"""The byte level of a GGUF file: header, key/value metadata and tensor-info table, checked.

Contract:

- ``read_tables(path)`` opens the file once and reads only the header, the metadata and the
  tensor-info table (little-endian GGUF v2 and v3) into a :class:`Tables`. Tensor data is never
  read: it only checks that the file is long enough to hold every tensor the table declares,
  back to back at the file's alignment, as llama.cpp requires. Large metadata arrays (the
  tokenizer's tokens, scores, merges, token types) are skipped, not decoded; only their
  lengths are kept (:class:`Array`).
- Every failure is a :class:`GGUFError` whose message starts with the file path: missing, a
  directory, unreadable, bad magic, unsupported version, truncated anywhere, counts or lengths
  the file cannot possibly hold (rejected before anything is allocated), or a tensor table
  llama.cpp would refuse. What the metadata *means* is :mod:`local_models.gguf`'s business.

Plain ``struct`` on a buffered read; no numpy, no llama.cpp, no I/O at import. Blocking.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Final, TypeAlias

import msgspec

__all__ = ["GGML_TYPES", "Array", "GGUFError", "Tables", "Tensor", "Value", "read_tables"]


class GGUFError(Exception):
    """A GGUF file that cannot be read or used; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[GGUFError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


# ggml_type -> (name, elements per block, bytes per block), from ggml/include/ggml.h and the
# type_traits table in ggml/src/ggml.c (block structs in ggml-common.h) of the same sources.
# Numbers missing here were removed from ggml (4, 5, 31-33, 36-38).
GGML_TYPES: Final[dict[int, tuple[str, int, int]]] = {
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


class Array(msgspec.Struct, frozen=True):
    """A metadata array: its element type, length, and values when short and numeric."""

    elem_type: int
    length: int
    values: tuple[int | float | bool, ...] | None


Value: TypeAlias = int | float | bool | str | Array


class Tensor(msgspec.Struct, frozen=True):
    """One entry of the tensor-info table: its size in bytes and offset in the data."""

    name: str
    ggml_type: int
    n_elements: int
    n_bytes: int
    offset: int


class Tables(msgspec.Struct, frozen=True):
    """What :func:`read_tables` read: the metadata by key, the tensor table in file order,
    and the file offset where tensor data starts."""

    path: str
    file_size: int
    kv: dict[str, Value]
    tensors: list[Tensor]
    data_offset: int


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

def read_tables(path: str | os.PathLike[str]) -> Tables:
    """Read and check the header, metadata and tensor table of the GGUF file at ``path``
    (a few MB at most); raise ``GGUFError`` if it is unreadable or corrupt. Blocking."""
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
    return Tables(spath, file_size, kv, tensors, data_offset)



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


def _read_kv(cur: _Cursor, path: str, n_kv: int) -> dict[str, Value]:
    kv: dict[str, Value] = {}
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


def _read_value(cur: _Cursor, path: str, key: str, vtype: int) -> Value:
    if vtype == _T_STRING:
        return cur.string()
    if vtype == _T_ARRAY:
        return _read_array(cur, path, key)
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise GGUFError(path, f"corrupt metadata: key {key!r} has invalid type {vtype}")
    return cur.unpack(fmt)[0]


def _read_array(cur: _Cursor, path: str, key: str) -> Array:
    elem_type = cur.u32()
    length = cur.u64()
    if elem_type == _T_STRING:
        cur.skip_strings(length)
        return Array(elem_type, length, None)
    fmt = _SCALARS.get(elem_type)
    if fmt is None:  # llama.cpp refuses nested arrays too
        raise GGUFError(path, f"corrupt metadata: key {key!r} is an array of invalid type")
    n_bytes = length * fmt.size
    if length > _MAX_DECODED_ARRAY:
        cur.skip(n_bytes)
        return Array(elem_type, length, None)
    many = struct.Struct(f"<{length}{fmt.format[1:]}")
    return Array(elem_type, length, cur.unpack(many))


def _alignment(kv: dict[str, Value], path: str) -> int:
    value = kv.get("general.alignment", _DEFAULT_ALIGNMENT)
    if type(value) is not int or value <= 0 or value & (value - 1):
        raise GGUFError(path, f"corrupt metadata: general.alignment {value!r} is not a power of 2")
    return value


def _read_tensor_infos(cur: _Cursor, path: str, n_tensors: int) -> list[Tensor]:
    tensors: list[Tensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string()
        if len(name.encode()) > _MAX_TENSOR_NAME or name in seen:
            raise GGUFError(path, f"corrupt tensor table: bad or duplicate name for tensor {i}")
        seen.add(name)
        tensors.append(_read_tensor_info(cur, path, name))
    return tensors


def _read_tensor_info(cur: _Cursor, path: str, name: str) -> Tensor:
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
    traits = GGML_TYPES.get(ggml_type)
    if traits is None:
        raise GGUFError(path, f"tensor {name!r} has unknown ggml type {ggml_type}")
    type_name, block, type_size = traits
    if dims and dims[0] % block:
        raise GGUFError(
            path, f"tensor {name!r}: row of {dims[0]} is not a multiple of {type_name} blocks"
        )
    return Tensor(name, ggml_type, n_elements, n_elements // block * type_size, offset)


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_tensor_layout(
    path: str, tensors: list[Tensor], alignment: int, data_offset: int, file_size: int
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
