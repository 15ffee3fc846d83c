"""deploy/kubernetes: the example overlay renders with kubectl's built-in kustomize, every object
validates against the Kubernetes schemas kubernetes-validate bundles (no download), and the pod
keeps the invariants LMGate needs (one image, a shared spool, probes on endpoints that exist,
non-root, read-only root, no capabilities, a stop sequence that loses no record)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lmgate.settings import load_settings
from lmgate.spool import NGINX_STOPPED_NAME
from lmgate.writer import STDOUT

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAY = KUBE / "overlays" / "example"
# The oldest and newest Kubernetes versions whose schemas kubernetes-validate bundles.
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def render(target: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: scripts/setup.sh --dev installs it (Debian's kubernetes-client)")
    result = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    docs = render(OVERLAY)
    by_kind = {}
    for doc in docs:
        assert doc["kind"] not in by_kind, f"two {doc['kind']} objects"
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                            "ConfigMap", "Secret"}
    return by_kind


@pytest.fixture(scope="module")
def pod(objects) -> dict:
    return objects["Deployment"]["spec"]["template"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def pod_settings(objects, tmp_path: Path, name: str):
    """The settings a container reads: the ConfigMap's lmgate.yaml at LMGATE_CONFIG, plus its env."""
    c = container(objects["Deployment"]["spec"]["template"], name)
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    config = tmp_path / "lmgate.yaml"
    config.write_text(objects["ConfigMap"]["data"]["lmgate.yaml"])
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    assert env.pop("LMGATE_CONFIG") == f"{mount}/lmgate.yaml"
    return load_settings(config, environ={k: v for k, v in env.items() if k.startswith("LMGATE_")})


@pytest.mark.parametrize("target", [KUBE / "base", OVERLAY], ids=["base", "example"])
@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_objects_validate_against_the_schemas(target, version):
    for doc in render(target):
        kubernetes_validate.validate(doc, version, strict=True)


def test_both_containers_run_the_same_image_with_their_entrypoints(pod):
    nginx, sidecar = container(pod, "nginx"), container(pod, "sidecar")
    assert nginx["image"] == sidecar["image"] == "registry.example.com/lmgate:0.1.0"
    assert nginx["command"] == ["/app/scripts/entrypoint-nginx.sh"]
    assert sidecar["command"] == ["/app/scripts/entrypoint-sidecar.sh"]
    for script in ("entrypoint-nginx.sh", "entrypoint-sidecar.sh"):
        assert (REPO / "scripts" / script).exists()


def test_the_spool_is_one_emptydir_both_containers_mount_at_the_spool_folder(objects, pod, tmp_path):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for name in ("nginx", "sidecar"):
        spool = pod_settings(objects, tmp_path, name).stats.spool_dir
        mounts = [m for m in container(pod, name)["volumeMounts"]
                  if spool == Path(m["mountPath"]) or Path(m["mountPath"]) in spool.parents]
        assert [m["name"] for m in mounts] == ["spool"], f"{name}: {spool} is not on the spool volume"
        assert not mounts[0].get("readOnly")
    assert volumes["spool"] == {"name": "spool", "emptyDir": {}}


def test_config_and_allowlist_come_from_the_configmap_and_the_secret(objects, pod, tmp_path):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert volumes["allowlist"]["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]
    s = pod_settings(objects, tmp_path, "sidecar")
    mount = next(m for m in container(pod, "sidecar")["volumeMounts"] if m["name"] == "allowlist")
    # The folder is mounted, not the file (subPath): a subPath mount never sees the Secret's updates.
    assert "subPath" not in mount and s.auth.allowlist_path.parent == Path(mount["mountPath"])
    assert s.auth.allowlist_path.name in objects["Secret"]["data"]
    # Records go to the sidecar's stdout, for the log shipper; the sidecar stays on loopback.
    assert s.stats.output_path == STDOUT
    assert s.server.host == "127.0.0.1"


def test_probes_ask_endpoints_that_exist_on_the_configured_ports(objects, pod, tmp_path):
    nginx, sidecar = container(pod, "nginx"), container(pod, "sidecar")
    proxy = pod_settings(objects, tmp_path, "nginx").proxy
    ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    assert ports["proxy"] == proxy.port
    scheme = "HTTPS" if proxy.tls_cert_path else "HTTP"
    for probe in ("readinessProbe", "livenessProbe"):
        get = nginx[probe]["httpGet"]
        assert (get["path"], get["port"], get.get("scheme", "HTTP")) == ("/healthz", "proxy", scheme)
    assert "location = /healthz" in (REPO / "nginx" / "nginx.conf.template").read_text()
    port = pod_settings(objects, tmp_path, "sidecar").server.port
    asked = {probe: " ".join(sidecar[probe]["exec"]["command"]) for probe in ("startupProbe", "livenessProbe")}
    assert f"http://127.0.0.1:{port}/readyz" in asked["startupProbe"]
    assert f"http://127.0.0.1:{port}/livez" in asked["livenessProbe"]
    app = (REPO / "lmgate" / "app.py").read_text()
    assert 'add_get("/readyz"' in app and 'add_get("/livez"' in app


def test_tls_secret_is_mounted_where_the_settings_look(objects, pod, tmp_path):
    proxy = pod_settings(objects, tmp_path, "nginx").proxy
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in container(pod, "nginx")["volumeMounts"] if m["name"] == "tls")
    assert Path(proxy.tls_cert_path).parent == Path(proxy.tls_key_path).parent == Path(mount["mountPath"])
    assert volumes["tls"]["secret"]["defaultMode"] & 0o007 == 0   # the key: not for other users
    # `lmgate doctor` in the sidecar container calls this pod's nginx as it now speaks.
    env = {e["name"]: e["value"] for e in container(pod, "sidecar")["env"]}
    assert env["LMGATE_GATE_URL"] == f"https://127.0.0.1:{proxy.port}"


def test_every_container_is_non_root_read_only_without_capabilities(pod):
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001 == spec["securityContext"]["fsGroup"]
    assert "10001" in (REPO / "Dockerfile").read_text()
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        # Read-only root: /tmp is an emptyDir of the container's own.
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), c["name"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], c["name"]


def test_nginx_runtime_dir_is_on_a_writable_volume(objects, pod, tmp_path):
    runtime = pod_settings(objects, tmp_path, "nginx").proxy.runtime_dir
    mounts = [Path(m["mountPath"]) for m in container(pod, "nginx")["volumeMounts"] if not m.get("readOnly")]
    assert any(m == runtime or m in runtime.parents for m in mounts)


def test_prometheus_scrapes_a_port_that_answers_metrics_alone(objects, pod, tmp_path):
    settings = pod_settings(objects, tmp_path, "sidecar")
    assert settings.server.host == "127.0.0.1"       # /auth: the pod's loopback only
    assert settings.metrics.host == "0.0.0.0" and settings.metrics.port
    ports = {p["name"]: p["containerPort"] for p in container(pod, "sidecar")["ports"]}
    assert ports == {"metrics": settings.metrics.port}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_stop_sequence_drains_then_lets_the_sidecar_outlive_nginx(objects, pod, tmp_path):
    nginx, sidecar = container(pod, "nginx"), container(pod, "sidecar")
    drain = nginx["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[0] == "sleep" and int(drain[1]) >= 5
    wait = " ".join(sidecar["lifecycle"]["preStop"]["exec"]["command"])
    # The sidecar waits for the file `lmgate nginx` writes in the shared spool folder.
    assert f'"{pod_settings(objects, tmp_path, "sidecar").stats.spool_dir / NGINX_STOPPED_NAME}"' in wait
    waited = int(re.search(r"time.monotonic\(\) \+ (\d+)", wait).group(1))
    # nginx: the drain, then `lmgate nginx`'s graceful stop; the sidecar: its wait, the spool's
    # last read (2 s) and aiohttp's shutdown (5 s); all within the grace period.
    assert int(drain[1]) + pod_settings(objects, tmp_path, "nginx").proxy.shutdown_timeout_seconds < waited
    assert waited + 2 + 5 < pod["spec"]["terminationGracePeriodSeconds"]
    strategy = objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


def test_service_pdb_and_hpa_point_at_the_pods(objects, pod):
    labels = pod["metadata"]["labels"]
    deployment = objects["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    nginx_ports = {p["name"]: p["containerPort"] for p in container(pod, "nginx")["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in nginx_ports
    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
