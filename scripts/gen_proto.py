"""Generate the Python protobuf and gRPC modules from proto/*.proto (STYLE §12).

The generated files live beside the .proto files in proto/ and are never edited by hand.
protoc runs on a copy laid out as tether/proto/NAME.proto, so that the generated gRPC module
imports `tether.proto.NAME_pb2` (the installed name) instead of a bare top-level `NAME_pb2`.

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --check    # exit 1 when the checked-in files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto/*.proto; return the generated files (in out_dir)."""
    from grpc_tools import protoc  # imported here: only needed by developers

    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        pkg = src / "tether" / "proto"
        pkg.mkdir(parents=True)
        for proto in protos:
            shutil.copy(proto, pkg / proto.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            *(f"tether/proto/{p.name}" for p in protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / "tether" / "proto").iterdir()):
            if f.name.endswith(SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated files are stale")
    args = parser.parse_args(argv)
    if not args.check:
        for f in generate(PROTO_DIR):
            print(f"wrote {f.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh if not filecmp.cmp(f, PROTO_DIR / f.name, shallow=False)]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python scripts/gen_proto.py")
            return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
