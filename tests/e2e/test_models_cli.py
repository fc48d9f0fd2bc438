"""`sidecar models`: the local model table, broken files named, exit status."""

from __future__ import annotations

from pathlib import Path

from tests.support.gguf_files import TinyModel, truncated_copy, write_model, write_not_gguf
from tests.support.process import run_cli


def test_models_lists_the_embedded_default() -> None:
    res = run_cli("models", env={"SIDECAR_CONFIG": ""})
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "SIZE", "QUANT", "ARCH"]
    assert row.split()[0] == "smollm2" and "Q4_1" in row and "llama" in row
    assert "2048x8 (max 8192)" in row and "kv 360 MiB" in row and row.endswith("ok")
    assert "GPU offload:" in res.stdout and "memory budget:" in res.stdout
    assert "(memory floor)" in res.stdout


def test_models_names_broken_files_and_keeps_the_rest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    good = write_model(models / "Tiny-Good.gguf", TinyModel())
    truncated_copy(good, models / "cut.gguf", good.stat().st_size // 2)
    write_not_gguf(models / "notes.gguf")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[local]\nmodel_dirs = ["{models}", "{tmp_path / "missing"}"]\n'
        f'[[local_models]]\nname = "gone"\npath = "{tmp_path / "gone.gguf"}"\n'
    )
    res = run_cli("models", "--config", str(config))
    assert res.returncode == 1
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert lines["tiny-good"].endswith("ok")
    assert "error:" in lines["cut"] and "cut.gguf" in lines["cut"]
    assert "error:" in lines["notes"] and "not a GGUF file" in lines["notes"]
    assert "error:" in lines["gone"] and "gone.gguf" in lines["gone"]
    assert "missing" in res.stdout  # the missing directory is a warning
