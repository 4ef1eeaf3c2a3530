"""``kiosk-model-server`` command line: serve the built-in models over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from kiosk_model_server.models import build_model
from kiosk_model_server.server import ModelServer, status_code


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("versions must be positive integers")
    return values


def _code(text: str) -> str:
    try:
        return status_code(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiosk-model-server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8500, help="port (0 = pick a free one)")
    p.add_argument("--models", default="segmentation,null",
                   help="comma-separated models; NAME or NAME=KIND with KIND one of "
                        "segmentation, mesmer, mesmer-panoptic (deepcell's Mesmer signature), "
                        "spot (deepcell-spots' signature), null, identity, or a Kiosk default model "
                        "(NuclearSegmentation, CytoplasmSegmentation, PhaseCytoSegmentation, "
                        "MultiplexSegmentation, SpotDetection: also serves the version the Kiosk "
                        "asks for)")
    p.add_argument("--versions", type=_int_list, default=(1,), help="versions served, e.g. 1,2")
    p.add_argument("--tile", type=int, default=None,
                   help="fixed input height/width of segmentation models (default: any)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every call")
    p.add_argument("--fail-next", type=int, default=0, help="fail the first N calls")
    p.add_argument("--fail-code", type=_code, default="UNAVAILABLE",
                   help="gRPC status of injected failures")
    p.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    p.add_argument("--max-message-bytes", type=int, default=-1,
                   help="gRPC message size limit (-1 = unlimited, as TF Serving)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; prints 'listening on HOST:PORT' once ready."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = []
    try:
        for item in filter(None, (m.strip() for m in args.models.split(","))):
            name, _, kind = item.partition("=")
            models.append(build_model(kind or name, name, args.versions, args.tile))
        server = ModelServer(models, host=args.host, port=args.port, latency_ms=args.latency_ms,
                             max_workers=args.workers, max_message_bytes=args.max_message_bytes)
        server.fail_next(args.fail_next, args.fail_code)
        server.start()
    except (ValueError, RuntimeError) as err:
        print(f"kiosk-model-server: {err}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"kiosk-model-server listening on {server.address} models="
          + ",".join(sorted(server.models)), flush=True)
    done.wait()
    server.stop(grace=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
