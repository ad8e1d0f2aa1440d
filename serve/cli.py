"""Command line.

- ``loraserve up [--config deploy/local.yaml] [--ray-env deploy/ray.env] [--metrics-export-port 8080]``:
  start a local Ray with the env file's process-level switches and serve a Serve config file;
  Ctrl-C (or SIGTERM) shuts Serve and Ray down, and no Ray process is left behind.
- ``loraserve export [--config deploy/local.yaml] [--force]``: build (or find in the cache) the
  ONNX variants the config serves, with progress and each variant's parity result; ``--force``
  rebuilds and replaces the files, which running replicas pick up once the new ones pass parity.
- ``loraserve train --train data.jsonl --out adapters/NAME [...]``: fine-tune a LoRA
  classification adapter (``models.training.finetune``; ``loraserve train --help`` lists the options).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import yaml
from pydantic import ValidationError

from serve import launcher
from serve.settings import load_config, load_settings


def _config_problem(exc: Exception) -> str:
    """One line for a config that cannot be read or validated."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
    what = "not valid YAML" if isinstance(exc, yaml.YAMLError) else type(exc).__name__
    return f"{what}: {' '.join(str(exc).split())}"


def _up(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        node = launcher.NodeEnv.from_file(args.ray_env)
        service = launcher.LocalService(config, node, args.metrics_export_port)  # validates
    except launcher.StartupError as exc:
        print(f"loraserve: cannot start {args.config}: {exc}", file=sys.stderr)
        return 2
    except (OSError, yaml.YAMLError, ValidationError, KeyError, TypeError, IndexError) as exc:
        print(f"loraserve: cannot start {args.config}: {_config_problem(exc)}", file=sys.stderr)
        return 2
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), http.get("port", 8000)

    def _terminate(signum, frame):
        # the first signal stops the service; more while it stops (an impatient second
        # Ctrl-C, or a supervisor's SIGTERM after SIGINT) must not interrupt the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # Install both explicitly: a process started in the background inherits SIGINT *ignored*,
    # and Ctrl-C must stop everything wherever `loraserve up` was started from.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    print(f"starting {args.config} ...", flush=True)
    try:
        service.start(say=lambda msg: print(msg, flush=True))
        print(
            f"\n  API      http://{host}:{port}/v1   (try: curl http://{host}:{port}/v1/models)\n"
            f"  health   http://{host}:{port}/health\n"
            f"  metrics  http://127.0.0.1:{service.metrics_export_port}/metrics\n\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down ...", flush=True)
        return 0
    except launcher.StartupError as exc:
        print(f"loraserve: cannot start {args.config}: {exc}", file=sys.stderr)
        return 2
    except launcher.DeployFailed as exc:
        print(f"loraserve: deploying {args.config} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        service.stop()


def _export(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    ok = launcher.prepare_variants(settings, force=args.force)
    print(f"variant cache: {settings.variants.cache_path()}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # its own parser lives with the training code (Ray-free)
        from models.training.finetune import main as train_main

        return train_main(argv[1:], prog="loraserve train")
    parser = argparse.ArgumentParser(prog="loraserve")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Ray locally and serve a Serve config file")
    up.add_argument("--config", default=launcher.DEFAULT_CONFIG)
    up.add_argument("--ray-env", default=launcher.DEFAULT_ENV_FILE,
                    help="KEY=VALUE file of Ray's process-level switches (default: %(default)s)")
    up.add_argument("--metrics-export-port", type=int, default=launcher.DEFAULT_METRICS_PORT,
                    help="Ray's Prometheus export port, as `ray start --metrics-export-port`")
    up.set_defaults(func=_up)
    export = sub.add_parser("export", help="build the ONNX variants of the config's models")
    export.add_argument("--config", default=launcher.DEFAULT_CONFIG)
    export.add_argument("--force", action="store_true", help="rebuild even when cached")
    export.set_defaults(func=_export)
    sub.add_parser("train", help="fine-tune a LoRA adapter (see `loraserve train --help`)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
