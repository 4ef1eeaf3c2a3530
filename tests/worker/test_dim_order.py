"""``dim_order`` as the Kiosk's mesmer and spot consumers write it back into the job hash.

Expected values restate kiosk-redis-consumer ``redis_consumer/consumers/base_consumer.py``
``detect_dimension_order`` at a183af9c66b2f3b278d600619ab28b24aa84bac6: rank-4 model input ->
spatial order 'YX'; the image's smallest non-batch axis is the channel axis; 'C' goes last
when that axis is the last one, first otherwise. The mesmer consumer passes the squeezed file
array, the spot consumer (batch, H, W, 1) frames.
"""

from __future__ import annotations

import pytest

from kiosk_worker.imaging import detected_dim_order


@pytest.mark.parametrize("shape,expected", [
    ((512, 480, 2), "YXC"),  # XYC two-channel Mesmer input
    ((2, 512, 480), "CYX"),  # channels first in the file
    ((96, 96, 1), "YXC"),  # a spot frame
    ((3, 96, 96, 2), "CYX"),  # a batch the consumer does not expect: its rule, unchanged
])
def test_detected_dim_order_as_upstream(shape: tuple[int, ...], expected: str) -> None:
    assert detected_dim_order(shape) == expected


def test_rank_five_model_inputs_name_z() -> None:
    assert detected_dim_order((8, 64, 64, 1), model_rank=5) == "ZYXC"
