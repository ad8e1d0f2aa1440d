"""Command line: ``loraserve up`` starts the service from a Serve config file.

Usage: ``loraserve up [--config deploy/local.yaml]``. Ctrl-C (or SIGTERM) shuts Serve and Ray
down; no Ray process is left behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from serve import launcher


def _up(args: argparse.Namespace) -> int:
    config = launcher.load_config(args.config)
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    # Install both explicitly: a process started in the background inherits SIGINT *ignored*,
    # and Ctrl-C must stop everything wherever `loraserve up` was started from.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    print(f"starting Ray and deploying {args.config} ...", flush=True)
    service = launcher.LocalService(config)
    try:
        service.start()
        print(
            f"\n  API      http://{host}:{port}/v1   (try: curl http://{host}:{port}/v1/models)\n"
            f"  health   http://{host}:{port}/health\n"
            f"  metrics  http://127.0.0.1:{service.settings.metrics.export_port}/metrics\n\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
        return 0
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Ray locally and serve a Serve config file")
    up.add_argument("--config", default=launcher.DEFAULT_CONFIG)
    up.set_defaults(func=_up)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
