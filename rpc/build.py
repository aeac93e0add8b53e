"""Regenerates node_pb2.py / node_pb2_grpc.py from node.proto (needs grpcio-tools).

    python -m pdserve.rpc.build
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}",
                        f"--grpc_python_out={HERE}", str(HERE / "node.proto")])
    if code != 0:
        return code
    # protoc emits a top-level `import node_pb2`; inside the package it must be relative.
    grpc_module = HERE / "node_pb2_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(re.sub(r"^import node_pb2 as", "from . import node_pb2 as", text, flags=re.M))
    return 0


if __name__ == "__main__":
    sys.exit(main())
