"""Generated TF-Serving-compatible messages (regenerate with tools/gen_protos.sh)."""
