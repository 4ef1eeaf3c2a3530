"""An example kiosk-worker consumer package (see README.md)."""

from kiosk_example_consumer.consumer import ThresholdConsumer, threshold_labels

__all__ = ["ThresholdConsumer", "threshold_labels"]
