"""Cold start: what a worker imports before it is ready (README benchmark target: ready in <= 0.7 s).

Heavy libraries are imported when a job first needs them, never at start: a Job-mode
pod pays its start-up for every batch, and a worker that only ever sees empty frames
(or a zip worker) never needs scikit-image at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("scipy", "skimage", "google.cloud", "boto3", "botocore", "prometheus_client", "grpc",
         "tifffile", "PIL", "tensorflow", "tensorflow_serving")

PROBE = textwrap.dedent("""
    import json, sys
    from kiosk_protocol.settings import load_settings
    from kiosk_worker.runner import Runner

    env = {"CONSUMER_TYPE": sys.argv[1], "STORAGE_BUCKET": sys.argv[2], "REDIS_HOST": "127.0.0.1",
           "REDIS_PORT": "1", "QUEUE": "q"}
    runner = Runner(load_settings(env))
    runner.consumer = runner.build_consumer()  # what kiosk-worker does before it registers
    runner.start_metrics()                     # METRICS_PORT unset: nothing served
    heavy = json.loads(sys.argv[3])
    print(json.dumps(sorted({m for m in sys.modules for h in heavy if m == h or m.startswith(h + ".")})))
""")


@pytest.mark.parametrize("consumer", ["segmentation", "zip", "tracking"])
@pytest.mark.parametrize("bucket", ["file:///tmp/kiosk-startup-probe", "gs://bucket", "s3://bucket"])
def test_start_up_imports_no_heavy_library(consumer: str, bucket: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, consumer, bucket, json.dumps(HEAVY)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"imported at start: {sorted({m.split('.')[0] for m in loaded})}"
