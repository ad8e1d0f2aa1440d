"""Expected reasons not to start print one clear line and exit 2, with no traceback and nothing
started: an unreadable or invalid config, and ports another service holds."""

import signal
import socket

import pytest
import yaml

from serve.cli import main


@pytest.fixture
def run(tmp_path, capfd):
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def up(config) -> tuple[int, str]:
        path = tmp_path / "config.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        rc = main(["up", "--config", str(path)])
        out, err = capfd.readouterr()
        assert "Traceback" not in out + err
        return rc, err

    yield up
    for s, handler in saved.items():
        signal.signal(s, handler)


def app(args: dict, port: int = 8000) -> dict:
    return {"http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": "x", "import_path": "serve.app:build_app", "args": args}]}


@pytest.mark.parametrize("config, says", [
    (app({"models": []}), "models: Tuple should have at least 1 item"),
    (app({"models": [{"id": "m", "source": "/nowhere", "task": "embed"}], "limits": {"max_inputs": 0}}),
     "limits.max_inputs: Input should be greater than or equal to 1"),
    (app({"models": [{"id": "m", "source": "/nowhere", "task": "embed", "typo_field": 1}]}),
     "typo_field: Extra inputs are not permitted"),
    ("applications: [\n", "not valid YAML"),
    ("just a string\n", "must hold a mapping"),
    ({**app({"models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}), "proxy_locaton": "HeadOnly"},
     "unknown key(s) in Ray's part of the config: proxy_locaton (did you mean proxy_location?)"),
    ({"applications": [{"name": "x", "import_path": "serve.app:build_app", "route_prefx": "/",
                        "args": {"models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}}]},
     "applications[0].route_prefx (did you mean route_prefix?)"),
])
def test_invalid_config_is_one_line(run, config, says):
    rc, err = run(config)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraserve: cannot start ") and says in lines[0], err


def test_busy_port_is_one_line_and_starts_nothing(run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = run(app({"models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}, port))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"already in use: 127.0.0.1:{port} (HTTP)" in lines[0], err
    import ray

    assert not ray.is_initialized()
