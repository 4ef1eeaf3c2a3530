"""``kiosk-worker``: consume Kiosk jobs from Redis queues.

Settings come from the environment (the Kiosk consumer's variables plus
ours); the flags override a few. A bad setting stops the worker at once with
one line naming it and exit code 2. ``--max-jobs N`` is batch mode (for
Kubernetes Jobs): exit 0 after N items or when the queue stays empty for
EMPTY_QUEUE_TIMEOUT seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from kiosk_protocol.errors import printable

EXIT_CONFIG = 2


#: Longest value a log argument shows.
ARG_LIMIT = 500


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class _PrintableArgs(logging.Filter):
    """Job keys and fields come from a public form: a log line shows them escaped and capped,
    so no field can forge log lines (newlines, ESC) or flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a, ARG_LIMIT) if isinstance(a, str | bytes) else a
                                for a in record.args)
        return True


def _setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_PrintableArgs())
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiosk-worker", description=__doc__.splitlines()[0])
    p.add_argument("--max-jobs", type=int, default=None,
                   help="batch mode: exit after N items or when the queue is empty (MAX_JOBS)")
    p.add_argument("--queue", default=None, help="queue(s) to consume, comma-separated (QUEUE)")
    p.add_argument("--consumer-type", default=None, help="consumer to run (CONSUMER_TYPE)")
    p.add_argument("--worker-name", default=None, help="name in Redis (WORKER_NAME, default HOSTNAME)")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"kiosk-worker: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kiosk_protocol.settings import SettingsError, load_settings

    overrides: dict[str, Any] = {}
    if args.queue is not None:
        overrides["queue"] = args.queue
    if args.consumer_type is not None:
        overrides["consumer_type"] = args.consumer_type
    if args.worker_name is not None:
        overrides["worker_name"] = args.worker_name
    if args.max_jobs is not None:
        if args.max_jobs < 0:
            return _fail("invalid option --max-jobs: must be zero or more")
        overrides["max_jobs"] = args.max_jobs
    try:
        settings = load_settings(os.environ, **overrides)
        if not settings.queues:
            raise SettingsError(f"invalid setting QUEUE={settings.queue!r}: names no queue")
    except SettingsError as err:
        return _fail(str(err))
    _setup_logging(settings.log_level, settings.log_json)

    from kiosk_worker.consumers import UnknownConsumer, get_consumer_class
    from kiosk_worker.runner import Runner

    try:
        get_consumer_class(settings.consumer_type)
        runner = Runner(settings)
        runner.install_signal_handlers()
        runner.consumer = runner.build_consumer()
    except (UnknownConsumer, SettingsError) as err:
        return _fail(str(err))
    except Exception as err:  # storage or Redis settings that cannot work at all
        logging.getLogger("kiosk_worker").debug("startup failed", exc_info=True)
        return _fail(f"cannot start: {type(err).__name__}: {err}")
    try:
        runner.start_metrics()
    except OSError as err:
        return _fail(f"invalid setting METRICS_PORT={settings.metrics_port}: cannot listen "
                     f"({err.strerror or err})")
    code = runner.run()
    if runner.abandoned:
        # A cancelled job thread may still sit in a model call: do not wait for it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
