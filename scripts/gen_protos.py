"""Generate the Python code for ``protos/`` into ``sidecar/grpc/v1/`` with grpcio-tools.

    .venv/bin/python scripts/gen_protos.py [--out DIR]     # make protos

The generated files are committed (so installing the sidecar needs no code generator) and
``tests/e2e/test_grpc.py`` regenerates them into a temporary directory and compares, so a
change to the .proto without regenerating fails the tests. The output depends on the
grpcio-tools version, which pyproject.toml pins for that reason.

protoc names the modules after the proto package (``sidecar.v1``), which inside this
repository is ``sidecar.grpc.v1``: the import between the generated modules and the
module name the message classes record are rewritten accordingly. The descriptor keeps
its canonical name ``sidecar/v1/sidecar.proto`` (what server reflection reports).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SOURCES = ("sidecar/v1/sidecar.proto",)
DEFAULT_OUT = ROOT / "sidecar" / "grpc" / "v1"
GENERATED = ("sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Write the generated modules into ``out`` (created if needed); return their paths."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTOS / s) for s in SOURCES),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_protos: protoc failed")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "sidecar" / "v1" / name).read_text()
            text = text.replace("from sidecar.v1 import ", "from sidecar.grpc.v1 import ")
            text = text.replace("'sidecar.v1.sidecar_pb2'", "'sidecar.grpc.v1.sidecar_pb2'")
            path = out / name
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output directory (default: {DEFAULT_OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(f"gen_protos: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
