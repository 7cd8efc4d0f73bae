"""The Kubernetes manifests (deploy/kubernetes): every overlay renders, every object is valid
against the schema of the pinned Kubernetes version, and the pieces fit together (probes on
the ports the servers listen on, Services and budgets selecting the pods, autoscalers aiming
at the Deployments, settings the servers accept, one NPU per pod on Ascend).

Rendering is tests/kustomize.py (the kustomize subset the manifests use), so no kubectl is
needed; where kubectl is installed, its own ``kubectl kustomize`` must give the same objects.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kustomize import KustomizeError, build, json_patch
from pllava_decoder.settings import ENV_PREFIX as DECODER_ENV, DecoderSettings
from pllava_encoder.settings import ENV_PREFIX as ENCODER_ENV, EncoderSettings
from pllava_client import Client
from pllava_client.security import ClientTls
from pllava_serving.certs import DEFAULT_HOSTS, FILES, make_certs
from pllava_serving.settings import load_settings
from servers import start_decoder, start_encoder

#: The Kubernetes version the manifests are checked against (gRPC probes are GA since 1.27,
#: autoscaling/v2 since 1.23, policy/v1 budgets since 1.21).
KUBERNETES_VERSION = "1.31.0"
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "ascend", "cpu-secure")
SECURE = DEPLOY / "components" / "secure"
NPU = "huawei.com/Ascend910"


def by_kind_and_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    index = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(index) == len(objects), "two objects share a kind and name"
    return index


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, by_kind_and_name(build(DEPLOY / "overlays" / request.param))


def test_every_object_is_valid_for_the_pinned_kubernetes(overlay):
    name, objects = overlay
    kinds = sorted(kind for kind, _ in objects)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Deployment", "Service",
                            "Service", "Service", "PodDisruptionBudget", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "HorizontalPodAutoscaler", "NetworkPolicy"]), kinds
    for (kind, obj_name), obj in objects.items():
        try:  # strict: an unknown or misspelt field is an error too
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {kind}/{obj_name} at {'.'.join(map(str, err.path))}: {err.message}")


def test_the_validator_rejects_a_broken_object(overlay):
    """The check above can fail: a misspelt field and a wrong type are caught."""
    _, objects = overlay
    deployment = yaml.safe_load(yaml.safe_dump(objects["Deployment", "pllava-decoder"]))
    json_patch(deployment, {"op": "add", "path": "/spec/template/spec/containers/0/readinessProbe/grcp",
                            "value": {"port": 50052}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    service = yaml.safe_load(yaml.safe_dump(objects["Service", "pllava-decoder"]))
    service["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def settings_of(objects, tmp_path: Path, environ: dict | None = None) -> tuple[EncoderSettings, DecoderSettings]:
    """The ConfigMap's settings files, loaded as the servers load them (unknown keys and bad
    values are errors), in ``environ`` (default: none)."""
    data = objects["ConfigMap", "pllava-settings"]["data"]
    loaded = []
    for key, cls, prefix in (("encoder.yaml", EncoderSettings, ENCODER_ENV), ("decoder.yaml", DecoderSettings,
                                                                             DECODER_ENV)):
        path = tmp_path / key
        path.write_text(data[key])
        loaded.append(load_settings(cls, yaml_path=path, env_prefix=prefix, environ=environ or {}))
    return loaded[0], loaded[1]


def service_links(objects) -> dict[str, str]:
    """The variables Kubernetes gives a pod for every Service with a cluster IP in its namespace
    (unless the pod sets enableServiceLinks: false), as the kubelet names them."""
    env = {}
    for (kind, name), obj in objects.items():
        if kind != "Service" or obj["spec"].get("clusterIP") == "None":
            continue
        ip, prefix = "10.96.0.7", name.upper().replace("-", "_")
        first = obj["spec"]["ports"][0]
        env[f"{prefix}_SERVICE_HOST"], env[f"{prefix}_SERVICE_PORT"] = ip, str(first["port"])
        env[f"{prefix}_PORT"] = f"tcp://{ip}:{first['port']}"
        for port in obj["spec"]["ports"]:
            base = f"{prefix}_PORT_{port['port']}_TCP"
            env[base] = f"tcp://{ip}:{port['port']}"
            env.update({f"{base}_PROTO": "tcp", f"{base}_PORT": str(port["port"]), f"{base}_ADDR": ip})
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper()}"] = str(port["port"])
    return env


def test_the_services_variables_reach_no_setting(overlay, tmp_path):
    """The Service pllava-decoder gives every pod PLLAVA_DECODER_SERVICE_HOST,
    PLLAVA_DECODER_PORT=tcp://..., ...: the decoder refused them as unknown settings (and read
    the last as its port) until the pods turned service links off and the servers skipped them."""
    name, objects = overlay
    links = service_links(objects)
    assert "PLLAVA_DECODER_PORT" in links and "PLLAVA_DECODER_SERVICE_PORT_GRPC" in links
    assert settings_of(objects, tmp_path, links) == settings_of(objects, tmp_path)
    for stage in ("encoder", "decoder"):
        assert pod_spec(objects, stage)["enableServiceLinks"] is False


def pod_spec(objects, stage: str) -> dict:
    return objects["Deployment", f"pllava-{stage}"]["spec"]["template"]["spec"]


def test_the_pieces_fit_together(overlay, tmp_path):
    name, objects = overlay
    encoder, decoder = settings_of(objects, tmp_path)
    assert decoder.encoder == f"dns:///pllava-encoder:{encoder.port}"  # the headless Service
    assert encoder.model == decoder.model == "/model" and encoder.host == decoder.host == "0.0.0.0"

    for stage, settings in (("encoder", encoder), ("decoder", decoder)):
        deployment = objects["Deployment", f"pllava-{stage}"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        spec = pod_spec(objects, stage)
        (container,) = spec["containers"]
        assert container["command"] == [f"pllava-{stage}"]
        assert container["args"] == ["--config", f"/etc/pllava/{stage}.yaml"]
        assert container["ports"] == [{"name": "grpc", "containerPort": settings.port},
                                      {"name": "metrics", "containerPort": settings.metrics_port}]
        assert settings.metrics_port != 0
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.metrics_port),
                               "prometheus.io/path": "/metrics"}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name.endswith("-secure"):  # the health service, over TLS (test_the_secure_overlay_...)
                assert container[probe]["exec"]["command"][3] == f"127.0.0.1:{settings.port}", probe
            else:
                assert container[probe]["grpc"] == {"port": settings.port}, probe  # the health service
        # SIGTERM drains for grace_s; Kubernetes must wait longer before it kills the pod.
        assert spec["terminationGracePeriodSeconds"] > settings.grace_s
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["model"]["mountPath"] == "/model" and mounts["model"]["readOnly"] is True
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "pllava-model"
        assert mounts["settings"]["mountPath"] == "/etc/pllava"
        assert volumes["settings"]["configMap"]["name"] == "pllava-settings"
        # Not root: the image's own user, which the volumes' group lets write (docker/Dockerfile).
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"],
                spec["securityContext"]["fsGroup"]) == (*image_user(), image_user()[1])
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert set(container["resources"]["requests"]) >= {"cpu", "memory"}
        assert "memory" in container["resources"]["limits"]
        assert container["image"].startswith("pllava-serve")

        budget = objects["PodDisruptionBudget", f"pllava-{stage}"]
        assert budget["spec"]["selector"]["matchLabels"] == labels
        scaler = objects["HorizontalPodAutoscaler", f"pllava-{stage}"]["spec"]
        assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": f"pllava-{stage}"}
        assert 1 <= scaler["minReplicas"] <= scaler["maxReplicas"]

    # The encoders take gRPC calls from the decoder pods only; their metrics stay open.
    policy = objects["NetworkPolicy", "pllava-encoder"]["spec"]
    assert policy["podSelector"]["matchLabels"] == pod_spec_labels(objects, "encoder")
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = policy["ingress"]
    assert grpc_rule == {"from": [{"podSelector": {"matchLabels": pod_spec_labels(objects, "decoder")}}],
                         "ports": [{"port": "grpc"}]}
    assert metrics_rule == {"ports": [{"port": "metrics"}]}

    headless = objects["Service", "pllava-encoder"]["spec"]
    assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == encoder.port
    assert headless["selector"] == pod_spec_labels(objects, "encoder")
    for service, cluster_ip in (("pllava-decoder", None), ("pllava-decoders", "None")):
        spec = objects["Service", service]["spec"]
        assert spec.get("clusterIP") == cluster_ip and spec["ports"][0]["port"] == decoder.port
        assert spec["selector"] == pod_spec_labels(objects, "decoder")
    assert "ReadWriteMany" in objects["PersistentVolumeClaim", "pllava-model"]["spec"]["accessModes"]
    # The decoder's compiled graphs are kept where a container restarted in the pod finds them.
    spec = pod_spec(objects, "decoder")
    cache = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}.get("compile-cache")
    assert cache is not None and decoder.compile_cache == cache, (cache, decoder.compile_cache)
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["compile-cache"]

    npus = [pod_spec(objects, stage)["containers"][0]["resources"]["limits"].get(NPU) for stage in
            ("encoder", "decoder")]
    if name == "ascend":
        assert encoder.device == decoder.device == "Ascend"
        assert npus == [1, 1]
        for stage in ("encoder", "decoder"):
            resources = pod_spec(objects, stage)["containers"][0]["resources"]
            assert resources["requests"][NPU] == 1  # extended resources: requests equal limits
            hostpaths = {v["hostPath"]["path"] for v in pod_spec(objects, stage)["volumes"] if "hostPath" in v}
            assert "/usr/local/Ascend/driver" in hostpaths
    else:
        assert encoder.device == decoder.device == "CPU"
        assert npus == [None, None]


def image_user() -> tuple[int, int]:
    """The uid and gid the image runs as: docker/Dockerfile's ``USER UID:GID``."""
    (line,) = [line for line in (DEPLOY.parents[1] / "docker" / "Dockerfile").read_text().splitlines()
               if line.startswith("USER ")]
    uid, gid = line.split()[1].split(":")
    return int(uid), int(gid)


def pod_spec_labels(objects, stage: str) -> dict:
    return objects["Deployment", f"pllava-{stage}"]["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(name):
    """What ``kubectl kustomize`` made of the overlay (tests/kustomized, written by
    scripts/kustomize_golden.sh where kubectl is installed; CI has none): a manifest changed
    without running the script fails here, and so does a renderer that reads it otherwise."""
    written = (Path(__file__).parent / "kustomized" / f"{name}.yaml").read_text()
    theirs = by_kind_and_name([d for d in yaml.safe_load_all(written) if d])
    assert theirs == by_kind_and_name(build(DEPLOY / "overlays" / name)), (
        "the manifests and tests/kustomized differ: run scripts/kustomize_golden.sh")


def test_the_renderer_refuses_what_it_does_not_know(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap, name: other}\n    patch: '[]'\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n")
    with pytest.raises(KustomizeError, match="matches no object"):
        build(tmp_path)


def secure_pods(objects: dict | None = None) -> dict[str, dict]:
    """The encoder's and decoder's pod specs in the cpu-secure overlay (``objects``: as built)."""
    objects = by_kind_and_name(build(DEPLOY / "overlays" / "cpu-secure")) if objects is None else objects
    return {stage: pod_spec(objects, stage) for stage in ("encoder", "decoder")}


def test_the_secure_overlay_turns_on_tls_and_tokens_on_both_hops(tmp_path):
    """Every file the pods name comes from the Secret at /certs and is one `pllava make-certs`
    writes (never the CA's key); the settings the servers load from the pods' variables turn on
    TLS, client certificates and tokens on both hops; the probes speak TLS with the client
    certificate; and the certificate the documented command makes names every Service."""
    cert_files = set(FILES) - {"ca-key.pem"}
    objects = by_kind_and_name(build(DEPLOY / "overlays" / "cpu-secure"))
    for stage, spec in secure_pods(objects).items():
        (container,) = spec["containers"]
        volume = {v["name"]: v for v in spec["volumes"]}["certs"]
        assert volume["secret"] == {"secretName": "pllava-certs", "defaultMode": 0o440}
        assert spec["securityContext"]["fsGroup"] == image_user()[1]  # the group that may read them
        mount = {m["name"]: m for m in container["volumeMounts"]}["certs"]
        assert mount == {"name": "certs", "mountPath": "/certs", "readOnly": True}
        env = {e["name"]: e["value"] for e in container["env"]}
        probes = [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
        named = [*env.values(), *(arg for command in probes for arg in command if arg.startswith("/"))]
        for path in named:
            assert Path(path).parent == Path("/certs") and Path(path).name in cert_files, path
        cls, prefix = (EncoderSettings, ENCODER_ENV) if stage == "encoder" else (DecoderSettings, DECODER_ENV)
        settings = load_settings(cls, env_prefix=prefix, environ={**env, prefix + "MODEL": "/model"})
        assert settings.tls_cert and settings.tls_key and settings.tls_client_ca
        assert settings.auth_token_file == "/certs/token"
        if stage == "decoder":
            assert settings.encoder_tls_ca and settings.encoder_tls_cert and settings.encoder_token_file
        for command in probes:
            assert command == ["python", "-m", "pllava_client.health", f"127.0.0.1:{settings.port}",
                               "--tls-ca", "/certs/ca.pem", "--tls-cert", "/certs/client.pem",
                               "--tls-key", "/certs/client-key.pem"]

    # The Secret is made from what this command writes: its certificate names every Service.
    comment = (SECURE / "kustomization.yaml").read_text()
    (command,) = re.findall(r"^#\s+(pllava make-certs .*)$", comment, re.MULTILINE)
    words = shlex.split(command)
    hosts = words[4::2]
    assert words[:3] == ["pllava", "make-certs", "certs"] and set(words[3::2]) == {"--host"}, command
    certs = make_certs(tmp_path / "certs", [*DEFAULT_HOSTS, *hosts])  # as the command does
    from cryptography import x509
    names = x509.load_pem_x509_certificate(certs.server_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    services = {name for kind, name in objects if kind == "Service"}
    assert services <= set(names), (services, names)
    listed = re.findall(r"--from-file=certs/(\S+)", comment)
    assert sorted(listed) == sorted(cert_files), "the Secret must hold every file the pods name, and no CA key"


def test_servers_started_as_the_secure_pods_say_serve_over_tls_and_pass_their_probes(tiny_model_dir, tmp_path,
                                                                                      videos_dir):
    """The encoder and decoder started with the secure pods' variables (the Secret's folder
    made by `pllava make-certs`) serve captions over mutual TLS with the token, and each pod's
    probe command passes; without the client certificate the probe fails."""
    certs = make_certs(tmp_path / "certs")

    def here(value: str) -> str:
        return str(certs.folder / Path(value).name) if value.startswith("/certs/") else value

    pods = secure_pods()
    env = {stage: {e["name"]: here(e["value"]) for e in spec["containers"][0]["env"]} for stage, spec in pods.items()}
    tls = ClientTls.from_files(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    with start_encoder(tiny_model_dir, env=env["encoder"], tls=tls, log_dir=tmp_path) as encoder, \
            start_decoder(tiny_model_dir, encoder.address, tmp_path, "--max-context", "1024",
                          env=env["decoder"], tls=tls) as decoder:
        for stage, server in (("encoder", encoder), ("decoder", decoder)):
            probe = [sys.executable if arg == "python" else here(arg)
                     for arg in pods[stage]["containers"][0]["readinessProbe"]["exec"]["command"]]
            probe[3] = server.address
            run = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and "SERVING" in run.stdout, (stage, run.stdout, run.stderr)
            without_certificate = subprocess.run(probe[:-4], capture_output=True, text=True, timeout=60)
            assert without_certificate.returncode != 0, (stage, without_certificate.stdout)
        with Client(decoder.address, tls_ca=str(certs.ca), tls_cert=str(certs.client_cert),
                    tls_key=str(certs.client_key), token=certs.token.read_text().strip(), timeout=120) as client:
            assert len(client.caption_full(videos_dir / "still.jpg", max_new_tokens=3).token_ids) == 3
