"""Generate the Python stubs of protos/ into the repository root (specdec/v1/...). `make protos` runs this.

Usage: python scripts/gen_protos.py [OUT_DIR]   (OUT_DIR defaults to the repository root)
"""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    import grpc_tools

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + [str(p) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in {p.parent.relative_to(ROOT / "protos") for p in protos}:
        for part in [pkg, *pkg.parents][:-1]:
            (out_dir / part / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
