"""Private descriptor pool for our TF-Serving-compatible messages.

Our .proto files keep TensorFlow's package and message names
(``tensorflow.TensorProto``, ``tensorflow.serving.PredictRequest``...) so the
wire bytes, gRPC method paths and ``Any`` type URLs are TF Serving's. The same
fully qualified name cannot be registered twice in protobuf's default pool, so
loading ours next to tensorflow or tensorflow-serving-api (the tests do, to
compare bytes) would fail with "duplicate symbol". A separate pool avoids the
clash; message classes from any pool serialize and parse normally.
"""

from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()
for _dep in (any_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_dep.DESCRIPTOR.serialized_pb)
