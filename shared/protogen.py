"""Generate the Python stubs for every contract in ``proto/`` (``make proto``).

The stubs are written beside their ``.proto`` files so that protoc's own import names
(``dramaturg.<service>.v1``) are the package names. The drift test calls :func:`generate` into a
temporary folder and compares the result with what is checked in.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every contract, relative to ``root``, in a stable order."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) over ``root`` into ``out_dir``; return the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to generate

    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p) for p in proto_files(root)]
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    written = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    # Every folder on the way is a regular package, so that setuptools finds it.
    for folder in {p.parent for p in written}:
        while folder != out_dir:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PROTO_ROOT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp), args.root)
        for path in sorted(Path(tmp).rglob("*.py*")):
            target = args.root / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        # Remove stubs whose .proto is gone.
        expected = {args.root / p.relative_to(tmp) for p in written}
        for stale in args.root.rglob("*"):
            if stale.name.endswith(GENERATED_SUFFIXES) and stale not in expected:
                stale.unlink()
    print(f"generated {len(written)} files from {len(proto_files(args.root))} contracts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
