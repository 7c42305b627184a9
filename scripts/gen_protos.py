"""Generate the Python gRPC code for protos/ into twostage/v1/.

    python scripts/gen_protos.py          # regenerate in place
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale

The output depends only on the .proto files and the pinned grpcio-tools
version (pyproject.toml, extra "dev"), so CI can check it is current.
"""

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("twostage") / "v1"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_dir / PACKAGE_DIR / "__init__.py").write_text('"""Generated gRPC code for the twostage.v1 API."""\n')
    return sorted((out_dir / PACKAGE_DIR).iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = [p for p in generate(Path(tmp)) if p.is_file()]
        stale = [
            p.name for p in fresh
            if not (ROOT / PACKAGE_DIR / p.name).exists()
            or not filecmp.cmp(p, ROOT / PACKAGE_DIR / p.name, shallow=False)
        ]
    if stale:
        print(f"generated code is stale: {', '.join(stale)}; run python scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
