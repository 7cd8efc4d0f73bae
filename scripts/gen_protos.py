"""Regenerate the Python gRPC stubs from protos/ -- the one command for it.

    python scripts/gen_protos.py            # writes client/pllava_proto/v1/pllava_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_protos.py --out DIR  # writes the same files under DIR instead
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs differ from fresh ones

The committed stubs were generated with grpcio-tools 1.85.1 (bundled libprotoc 35.1). The
output is a pure function of the .proto files and the grpcio-tools version: protoc runs from
the repository root on relative paths, so no machine-specific path ends up in the files.
Another grpcio-tools version may produce different bytes (a version stamp is written into
the stubs); regenerate and commit the stubs after changing the pinned version.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = "protos"                       # include path, relative to ROOT
PROTO_FILES = ("pllava_proto/v1/pllava.proto",)  # relative to PROTO_ROOT
DEFAULT_OUT = "client"                      # relative to ROOT
GRPCIO_TOOLS_VERSION = "1.85.1"             # the version the committed stubs come from


def generated_files() -> list[str]:
    """Paths (relative to the output folder) of every file the generator writes."""
    out = []
    for proto in PROTO_FILES:
        stem = proto[: -len(".proto")]
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return out


def generate(out_dir: Path | str) -> list[Path]:
    """Run protoc (from grpcio-tools) into ``out_dir``; return the files written."""
    from grpc_tools import protoc

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(f"{PROTO_ROOT}/{p}" for p in PROTO_FILES)]
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths in, so nothing machine-specific gets recorded
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args)}")
    return [out_dir / f for f in generated_files()]


def installed_tools_version() -> str:
    return metadata.version("grpcio-tools")


def check(committed_dir: Path) -> list[str]:
    """Regenerate into a temporary folder; return the files that differ from ``committed_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        bad = []
        for rel in generated_files():
            ours = committed_dir / rel
            if not ours.is_file() or not filecmp.cmp(ours, Path(tmp) / rel, shallow=False):
                bad.append(rel)
        return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_OUT,
                        help="output folder (default: client/)")
    parser.add_argument("--check", action="store_true",
                        help="only compare the stubs in --out with freshly generated ones")
    args = parser.parse_args(argv)

    version = installed_tools_version()
    if version != GRPCIO_TOOLS_VERSION:
        print(f"warning: grpcio-tools {version} is installed but the stubs are pinned to "
              f"{GRPCIO_TOOLS_VERSION}; the output may differ", file=sys.stderr)
    if args.check:
        bad = check(args.out)
        if bad:
            print("stubs differ from what the generator produces: " + ", ".join(bad)
                  + "\nrun: python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
