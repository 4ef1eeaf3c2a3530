"""TF Serving client benchmarks: encode throughput and cold-import cost.

Each row runs the upstream way (baseline) and ours in the same process run.
``ratio`` is the improvement factor: ours/baseline for throughput,
baseline/ours for time and memory, so > 1 always means ours is better.

Run standalone: ``python -m bench.bench_tfs``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kiosk_worker.tfs.messages import encode_predict_request
from kiosk_worker.tfs.protos import predict_pb2

# Peak RSS from VmHWM: ru_maxrss would carry over the parent's peak through fork+exec.
_CHILD = (
    "import time; t = time.perf_counter(); import {module}; "
    "dt = time.perf_counter() - t; "
    "kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
    "print(dt, kb)"
)


def float_val_request(model_name: str, version: int, name: str, arr: np.ndarray) -> bytes:
    """The upstream Kiosk encoding: every element through a Python float_val list."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.version.value = version
    tensor = req.inputs[name]
    tensor.dtype = 1  # DT_FLOAT
    for size in arr.shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.float_val.extend(arr.ravel().tolist())
    return req.SerializeToString()


def _best_rate(fn: Callable[[], bytes], nbytes: int, repeat: int) -> float:
    """MB/s of the fastest of ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / min(times) / 1e6


def encode_rows() -> list[dict[str, Any]]:
    # As a worker process does at start (kiosk_worker.runner.Runner.run), before any thread.
    from kiosk_worker.runner import keep_large_buffers

    rng = np.random.default_rng(0)
    sizes = (("4 MiB", (4, 256, 256, 4), 3), ("64 MiB", (8, 1024, 1024, 2), 1))
    arrays = {label: rng.random(shape, dtype=np.float32) for label, shape, _ in sizes}
    # The C library's defaults first (mallopt cannot be undone in this process).
    untuned = {label: _best_rate(lambda a=arr: encode_predict_request("m", {"image": a}, 1), arr.nbytes, 20)
               for label, arr in arrays.items()}
    tuned = keep_large_buffers()
    rows = []
    for label, _, base_repeat in sizes:
        arr = arrays[label]
        ours = _best_rate(lambda a=arr: encode_predict_request("m", {"image": a}, 1), arr.nbytes, 20)
        base = _best_rate(lambda a=arr: float_val_request("m", 1, "image", a), arr.nbytes, base_repeat)
        dest = np.empty_like(arr)
        copy = _best_rate(lambda a=arr, d=dest: np.copyto(d, a), arr.nbytes, 20)
        rows.append({"name": f"numpy -> PredictRequest encode ({label} float32)",
                     "baseline": round(base, 1), "ours": round(ours, 1), "unit": "MB/s",
                     "ratio": round(ours / base, 1),
                     "note": f"memcpy into a warm buffer {copy:,.0f} MB/s (ours {ours / copy:.2f}x of it); "
                             f"glibc defaults {untuned[label]:,.0f} MB/s (ours {ours / untuned[label]:.2f}x); "
                             f"large buffers kept: {tuned}"})
    return rows


def cold_import(module: str, runs: int = 3) -> tuple[float, float, float]:
    """Median (wall seconds incl. interpreter start, import seconds, peak RSS MB) of a fresh process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    walls, imports, rss = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD.format(module=module)],
                              capture_output=True, text=True, env=env, timeout=300, check=True)
        walls.append(time.perf_counter() - start)
        dt, kb = proc.stdout.split()[-2:]
        imports.append(float(dt))
        rss.append(int(kb) / 1024)
    return statistics.median(walls), statistics.median(imports), statistics.median(rss)


def import_rows() -> list[dict[str, Any]]:
    base = cold_import("tensorflow_serving.apis.predict_pb2")
    ours = cold_import("kiosk_worker.tfs.client")
    return [
        {"name": "client cold start (python -c import, wall)", "baseline": round(base[0], 3),
         "ours": round(ours[0], 3), "unit": "s", "ratio": round(base[0] / ours[0], 1)},
        {"name": "client import time (in process)", "baseline": round(base[1], 3),
         "ours": round(ours[1], 3), "unit": "s", "ratio": round(base[1] / ours[1], 1)},
        {"name": "client cold start peak RSS", "baseline": round(base[2], 1),
         "ours": round(ours[2], 1), "unit": "MB", "ratio": round(base[2] / ours[2], 1)},
    ]


def run() -> list[dict[str, Any]]:
    """All TF Serving client rows: name, baseline, ours, unit, ratio (>1 = ours better)."""
    imports = import_rows()  # first, before this process grows
    return encode_rows() + imports


def main() -> None:
    rows = run()
    print(f"{'benchmark':<48} {'baseline':>10} {'ours':>10} {'unit':>6} {'ratio':>7}")
    for r in rows:
        print(f"{r['name']:<48} {r['baseline']:>10} {r['ours']:>10} {r['unit']:>6} {r['ratio']:>6}x")


if __name__ == "__main__":
    main()
