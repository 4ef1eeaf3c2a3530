"""kiosk-model-server: a TF-Serving-compatible gRPC server with deterministic models."""

from kiosk_model_server.server import ModelServer

__all__ = ["ModelServer"]
