"""deploy/kuberay/raylm.yaml: a RayService that KubeRay's own CRD schema (vendored, v1.7.0) accepts, whose
serveConfigV2 is what `raylm build` writes now, wired the way raylm runs (the manifest's comments say why)."""

import copy
import importlib.util
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from raylm.config import AppConfig, load_config

ROOT = Path(__file__).parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
RAY_AGENT_PORT = 52365  # the dashboard agent: KubeRay's probes ask it for the raylet's health
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML: libyaml reads it in 0.2 s


def _regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", KUBERAY / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _as_kubectl_checks(schema: dict) -> dict:
    """An openAPIV3Schema as `kubectl apply` (strict server-side field validation) holds a manifest to it: an
    unknown field is an error rather than pruned, and OpenAPI's `nullable` admits null. `x-kubernetes-int-or-string`
    comes with its own anyOf. Not checked here: CEL rules (x-kubernetes-validations) and list-map key uniqueness."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _as_kubectl_checks(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _as_kubectl_checks(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_as_kubectl_checks(s) for s in schema[key]]
    if schema.pop("nullable", False):
        return {"anyOf": [schema, {"type": "null"}]}
    return schema


def _int_formats() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, bits in (("int32", 32), ("int64", 64)):
        checker.checks(name)(lambda v, bits=bits: not isinstance(v, int) or -2 ** (bits - 1) <= v < 2 ** (bits - 1))
    return checker


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    crd = yaml.load((KUBERAY / "crd" / "ray.io_rayservices.yaml").read_text(), Loader=Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_as_kubectl_checks(v1["schema"]["openAPIV3Schema"]),
                                      format_checker=_int_formats())


@pytest.fixture(scope="module")
def rayservice() -> dict:
    docs = [d for d in yaml.load_all((KUBERAY / "raylm.yaml").read_text(), Loader=Loader) if d]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return service


@pytest.fixture(scope="module")
def app_config(rayservice) -> AppConfig:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "Disabled"
    (application,) = serve_config["applications"]
    assert application["name"] == "raylm" and application["import_path"] == "raylm.serve:build_app"
    return AppConfig.model_validate(application["args"])


def _errors(validator, obj) -> list[str]:
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(obj)]


def test_the_rayservice_passes_kuberays_schema(validator, rayservice):
    assert _errors(validator, rayservice) == []


@pytest.mark.parametrize(("break_it", "where"), [
    (lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="1"), "replicas"),
    (lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),
    (lambda s: s["spec"]["serveService"]["spec"]["ports"][0].update(port=2 ** 31), "port"),
], ids=["a string for a number", "a misspelt field", "past int32"])
def test_a_broken_copy_fails_the_schema(validator, rayservice, break_it, where):
    broken = copy.deepcopy(rayservice)
    break_it(broken)
    assert any(where in e for e in _errors(validator, broken))


def test_serve_config_is_what_raylm_build_writes_now(rayservice, app_config):
    assert rayservice["spec"]["serveConfigV2"] == _regenerate().build(), \
        "stale: run .venv/bin/python deploy/kuberay/regenerate.py"
    assert app_config == load_config(KUBERAY / "raylm-config.yaml")


def _containers(rayservice) -> tuple[dict, list[dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    return head, [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]


def test_the_api_is_the_heads_serve_port_and_no_probe_waits_for_it(rayservice, app_config):
    head, workers = _containers(rayservice)
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert app_config.serve.host == "0.0.0.0" and ports["serve"] == app_config.serve.port
    (svc_port,) = rayservice["spec"]["serveService"]["spec"]["ports"]
    assert svc_port["targetPort"] == "serve"  # the head only: workers declare no such port
    probes = [c.get(p) for c in (head, *workers) for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    # KubeRay deploys serveConfigV2 once the head is Ready: a probe waiting for raylm would wait forever.
    assert not any(p and p.get("httpGet", {}).get("port") in ("serve", app_config.serve.port) for p in probes)
    assert all(w["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": RAY_AGENT_PORT} for w in workers)


def test_every_pod_mounts_the_api_keys_where_the_config_reads_them(rayservice, app_config):
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        (container,) = pod["containers"]
        mounted = {m["mountPath"]: secrets.get(m["name"]) for m in container["volumeMounts"]}
        assert mounted[str(app_config.serve.api_keys_file.parent)] == "raylm-api-keys"


def test_the_image_and_the_cluster_run_the_pinned_ray():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (ray_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray[")]
    ray_version = ray_pin.split("==")[1]
    manifest = yaml.load((KUBERAY / "raylm.yaml").read_text(), Loader=Loader)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py311-gpu$",
                     (KUBERAY / "Dockerfile").read_text(), re.MULTILINE)
