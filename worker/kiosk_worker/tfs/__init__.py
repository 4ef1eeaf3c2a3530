"""TensorFlow-free TF Serving client: wire-identical messages, tensor_content encoding.

Import ``kiosk_worker.tfs.client`` for TFServingClient; this package itself
imports nothing so that ``import kiosk_worker.tfs.tensor`` stays cheap.
"""
