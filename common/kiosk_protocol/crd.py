"""Coordinates of the ConsumerPool custom resource, for the operator, the CLI and tests."""

GROUP = "kiosk.deepcell.org"
VERSION = "v1alpha1"
PLURAL = "consumerpools"
KIND = "ConsumerPool"
API_VERSION = f"{GROUP}/{VERSION}"
