#!/usr/bin/env bash
# Regenerate worker/kiosk_worker/tfs/protos/*_pb2*.py(i) from the .proto files
# next to them (the generated files are committed; run this after editing a
# .proto). Needs grpcio-tools: PYTHON defaults to the project venv.
#
# Post-processing, and why:
#  * messages are registered in kiosk_worker.tfs.protos._pool.POOL instead of
#    protobuf's default pool: they carry TensorFlow's fully qualified names
#    (tensorflow.TensorProto, ...), which would collide with tensorflow /
#    tensorflow-serving-api if both were loaded in one process;
#  * the protobuf/grpc "generated with version X" runtime checks are dropped so
#    the committed files work with any protobuf >= 4.21 and grpcio >= 1.63;
#  * *_pb2_grpc.py files of protos without services are deleted.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="$root/worker/kiosk_worker/tfs/protos"
cd "$root/worker"
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
"$py" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    kiosk_worker/tfs/protos/*.proto
"$py" - "$out" <<'PY'
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*_pb2.py")):
    text = path.read_text()
    text = text.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
    text = text.replace(
        "from google.protobuf.internal import builder as _builder\n",
        "from google.protobuf.internal import builder as _builder\n"
        "from kiosk_worker.tfs.protos._pool import POOL as _POOL\n",
    )
    text = text.replace("_descriptor_pool.Default().AddSerializedFile", "_POOL.AddSerializedFile")
    text = text.replace("from google.protobuf import descriptor_pool as _descriptor_pool\n", "")
    assert "_POOL.AddSerializedFile" in text and "runtime_version" not in text, path
    path.write_text(text)
for path in sorted(out.glob("*_pb2_grpc.py")):
    text = path.read_text()
    if "channel.unary_unary" not in text:
        path.unlink()
        continue
    text = re.sub(r"GRPC_GENERATED_VERSION = .*?\n\n\n(?=class )", "", text, flags=re.S)
    text = text.replace("import warnings\n", "")
    assert "GRPC_GENERATED_VERSION" not in text, path
    path.write_text(text)
PY
echo "regenerated $(ls "$out"/*_pb2*.py | wc -l) modules in $out"
