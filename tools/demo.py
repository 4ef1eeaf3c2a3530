"""``make demo``: the whole pipeline on this machine, no cluster and no cloud account.

Makes synthetic cell images, submits them as Kiosk jobs (the frontend's hash format,
``file://`` bucket), runs the pool in local mode until it has scaled up, drained the
queue and scaled back to zero, then writes a preview PNG per result (the input with the
label outlines drawn on it, as ``kiosk results --preview`` does) and prints where they are.

Tooling, not part of the installed packages: run by tools/demo.sh (``make demo``) as
``python tools/demo.py``; tests import it as ``demo`` (tools/ is on pytest's pythonpath).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import kiosk_protocol as protocol
from harness.procs import stop_process
from kiosk_cli.preview import write_previews
from kiosk_operator import local


def make_images(directory: Path, count: int, size: int = 128) -> list[tuple[str, int]]:
    """Synthetic images with known cells: (file name relative to the bucket, true cell count)."""
    import numpy as np
    import tifffile

    from kiosk_model_server.synthetic import make_cells

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        image, labels = make_cells((size, size), n_cells=8 + i % 6, seed=i)
        name = f"cells-{i + 1:02d}.tif"
        tifffile.imwrite(directory / name, image)
        out.append((f"{directory.name}/{name}", int(len(np.unique(labels)) - 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiosk-demo", description=__doc__.splitlines()[0])
    p.add_argument("-f", "--file", default="examples/consumerpool-local.yaml", help="ConsumerPool YAML")
    p.add_argument("--images", type=int, default=20, help="number of sample images")
    p.add_argument("--model-latency-ms", type=float, default=250.0,
                   help="latency of the demo model server, so the scaling is visible")
    args = p.parse_args(argv)
    try:
        name, spec, _ = local.load_pool(args.file)
    except local.LocalError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    state = Path(".kiosk-local") / name
    bucket_url = local.local_bucket(spec.storage.bucket or "file://.kiosk-local/demo/bucket", Path.cwd())
    if not bucket_url.startswith("file://"):
        print("demo: the pool's storage.bucket must be a file:// directory", file=sys.stderr)
        return 2
    bucket = Path(bucket_url[len("file://"):])
    queue = spec.queues[0]

    redis_proc = None
    r = spec.redis
    try:
        if not local.listening(r.host, r.port):
            redis_proc = local.start_redis(r.port, state)
            print(f"started redis-server on {r.host}:{r.port}")
        import redis

        client = redis.Redis(host=r.host, port=r.port, decode_responses=True)
        images = make_images(bucket / "inputs", args.images)
        print(f"made {len(images)} synthetic cell images in {bucket / 'inputs'}")
        keys = [protocol.submit_job(client, queue, img, "segmentation", "1") for img, _ in images]
        print(f"submitted {len(keys)} jobs to queue '{queue}' (Kiosk job hashes)\n")

        code = subprocess.call([sys.executable, "-m", "kiosk_operator.local", "-f", args.file,
                                "--state-dir", str(state), "--exit-when-idle",
                                "--model-latency-ms", str(args.model_latency_ms)])
        if code != 0:
            print(f"demo: local mode exited with {code}", file=sys.stderr)
            return code

        print("\nresults:")
        done = 0
        previews = state / "previews"
        for (img, truth), key in zip(images, keys, strict=True):
            job = client.hgetall(key)
            done += job.get("status") == protocol.DONE
            where = job.get("output_url") or job.get("reason", "")
            print(f"  {img:<22} {job.get('status', '?'):<7} ({truth} true cells) -> {where}")
            if job.get("status") == protocol.DONE and job.get("output_file_name"):
                write_previews(bucket / job["output_file_name"], bucket / img, previews)
        print(f"\n{done}/{len(keys)} jobs done. Result zips (label TIFFs) are in {bucket}")
        if done:
            print(f"Previews (label outlines on the input, one PNG per result): {previews}")
        print(f"Worker logs: {state / 'logs'}")
        return 0 if done == len(keys) else 1
    except local.LocalError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    finally:
        stop_process(redis_proc, 10)


if __name__ == "__main__":
    sys.exit(main())
