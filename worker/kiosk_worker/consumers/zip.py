"""Registry name for the zip consumer (``BUILTIN['zip']``); the code lives in ``consumers.zipfile``."""

from kiosk_worker.consumers.zipfile import ZipConsumer

__all__ = ["ZipConsumer"]
