"""The deployment files under cluster/ are what the real tools accept, and they run the job
the repository ships.

- Every manifest under cluster/kuberay/ validates against KubeRay v1.7.0's CRD schemas
  (shared/schemas/kuberay-v1.7.0/), with every object closed where the API server would
  prune: a key the CRD does not declare is an error here, where the cluster would drop it
  without a word.
- cluster/aws/nightly.yaml passes the cluster-config validation of the installed Ray.
- Entrypoints, images, working directories, mounts and paths named in these files exist in
  the repository (or are what cluster/Dockerfile puts in the image), and the job spec the
  RayJob and RayCronJob run passes `batchjobs validate --offline` with their own arguments.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from batchjobs.cli import app
from batchjobs.compat import SUPPORTED
from batchjobs.spec import load_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_UP = CLUSTER / "aws" / "nightly.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
SCHEMAS = "kuberay-v1.7.0"
GPUS_PER_NODE = 8  # p5.48xlarge, and the H100 worker pods


def _schema_dir() -> Path | None:
    """shared/ beside the clone (CI: ../shared) or in it; the first one up the tree."""
    for base in (REPO, *REPO.parents):
        d = base / "shared" / "schemas" / SCHEMAS
        if d.is_dir():
            return d
    return None


# --- the strict CRD check ---------------------------------------------------------------

# The root `metadata` of a custom resource is a Kubernetes ObjectMeta, which CRDs leave
# undeclared (type: object); these are the fields a manifest may set there.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def closed(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that declares neither
    ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields: true`` (the objects
    whose unknown fields the API server prunes), and the ``x-kubernetes-*`` keys dropped."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = closed(value)
        else:
            out[key] = value
    if (
        schema.get("type") == "object"
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(schema_dir: Path) -> dict[str, dict[str, Any]]:
    """kind -> {"apiVersion": group/version, "schema": the closed schema of that version}."""
    crds = {}
    for path in sorted(schema_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage") and v.get("served"))
        schema = closed(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = OBJECT_META
        schema["properties"].pop("status", None)  # written by the operator, not by us
        crds[spec["names"]["kind"]] = {
            "apiVersion": f"{spec['group']}/{version['name']}",
            "schema": schema,
        }
    return crds


def crd_errors(doc: dict[str, Any], crds: dict[str, dict[str, Any]]) -> list[str]:
    """Every way ``doc`` breaks its kind's closed CRD schema, as 'path: message'."""
    crd = crds.get(doc.get("kind"))
    if crd is None:
        return [f"kind {doc.get('kind')!r} is not one of {sorted(crds)}"]
    errors = []
    if doc.get("apiVersion") != crd["apiVersion"]:
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {crd['apiVersion']!r}")
    validator = jsonschema.Draft7Validator(crd["schema"])
    for err in validator.iter_errors(doc):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{where}: {err.message}")
    return errors


@pytest.fixture(scope="module")
def crds() -> dict[str, dict[str, Any]]:
    schema_dir = _schema_dir()
    if schema_dir is None:
        pytest.skip(
            f"KubeRay CRD schemas not found: no shared/schemas/{SCHEMAS}/ in {REPO} or "
            "any folder above it (CI keeps a copy of shared/ beside the clone)"
        )
    return load_crds(schema_dir)


def manifests() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in manifests():
        for doc in docs(path):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kuberay_crd(path, crds):
    for doc in docs(path):
        assert crd_errors(doc, crds) == [], f"{path.name}: {doc.get('kind')}"


def test_kuberay_folder_holds_a_cluster_a_job_and_a_cron_job():
    assert sorted(by_kind()) == ["RayCluster", "RayCronJob", "RayJob"]


def _with(doc: dict[str, Any], path: str, key: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``key: value`` set in the mapping at ``path`` (a.b.0.c)."""
    out = copy.deepcopy(doc)
    node: Any = out
    for part in path.split(".") if path else []:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    return out


POD = "spec.rayClusterSpec.workerGroupSpecs.0.template.spec"
CRON_POD = "spec.jobTemplate.rayClusterSpec.headGroupSpec.template.spec"


@pytest.mark.parametrize(
    "kind, path, key, value, reported",
    [
        # the typo the issue names: a plain schema check passes it, the API server drops it
        ("RayJob", "spec", "shutdownAfterJobFinish", True, "shutdownAfterJobFinish"),
        ("RayJob", POD, "nodeSelecter", {"a": "b"}, "nodeSelecter"),
        ("RayJob", f"{POD}.containers.0.resources", "limit", {"cpu": "1"}, "limit"),
        ("RayCronJob", "spec", "concurrencyPolicy", "Forbid", "concurrencyPolicy"),
        ("RayCronJob", f"{CRON_POD}.volumes.0", "emptydir", {}, "emptydir"),
        ("RayCluster", "spec.headGroupSpec", "rayStartParam", {}, "rayStartParam"),
        ("RayCluster", "metadata", "label", {"a": "b"}, "label"),
        ("RayCluster", "", "status", {"state": "ready"}, "status"),
        # and the schema's own checks still apply
        ("RayJob", "spec", "backoffLimit", "2", "'2' is not of type 'integer'"),
    ],
)
def test_strict_check_rejects_what_the_crd_does_not_declare(crds, kind, path, key, value, reported):
    doc = by_kind()[kind]
    errors = crd_errors(_with(doc, path, key, value), crds)
    assert errors and any(reported in e for e in errors), errors


def test_strict_check_keeps_maps_open(crds):
    """Labels, node selectors and rayStartParams are maps: any key is declared."""
    doc = by_kind()["RayJob"]
    doc = _with(doc, "metadata.labels", "team.example.com/owner", "scoring")
    doc = _with(doc, POD, "nodeSelector", {"topology.kubernetes.io/zone": "us-east-1a"})
    doc = _with(doc, "spec.rayClusterSpec.headGroupSpec.rayStartParams", "log-color", "false")
    assert crd_errors(doc, crds) == []


def test_closed_schema_honours_preserve_unknown_fields():
    schema = closed(
        {
            "type": "object",
            "properties": {
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "shut": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        }
    )
    v = jsonschema.Draft7Validator(schema)
    assert not list(v.iter_errors({"free": {"anything": 1}, "shut": {"a": "x"}}))
    assert [e.message for e in v.iter_errors({"shut": {"b": "x"}})] == [
        "Additional properties are not allowed ('b' was unexpected)"
    ]


def operator_errors(doc: dict[str, Any]) -> list[str]:
    """The checks KubeRay v1.7's operator makes before it acts on a resource (its
    utils/validation.go: ValidateRay{Cluster,Job,CronJob}{Metadata,Spec}) that a schema
    cannot express, for the fields these manifests use."""
    errors = []
    name, kind = doc["metadata"]["name"], doc["kind"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"{name!r} is not a DNS-1035 label")
    if len(name) > {"RayCluster": 53}.get(kind, 47):  # the cluster name gets 6 more
        errors.append(f"{name!r} is too long for a {kind}")

    def cluster(spec: dict[str, Any], where: str) -> None:
        for group in groups(spec):
            params = group.get("rayStartParams", {})
            if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(
                params
            ):
                errors.append(f"{where}: resources in both rayStartParams and resources")
            if "labels" in params:
                errors.append(f"{where}: rayStartParams labels")
            if not group["template"]["spec"].get("containers"):
                errors.append(f"{where}: a group without containers")
        if spec.get("authOptions", {}).get("mode") == "token":
            version = tuple(int(x) for x in spec["rayVersion"].split(".")[:3])
            if version < (2, 52, 0):
                errors.append(f"{where}: token authentication needs Ray 2.52")

    def job(spec: dict[str, Any], where: str) -> None:
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append(f"{where}: ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
            errors.append(f"{where}: activeDeadlineSeconds <= 0 or backoffLimit < 0")
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))  # must be YAML
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errors.append(f"{where}: neither rayClusterSpec nor clusterSelector")
        if "rayClusterSpec" in spec:
            cluster(spec["rayClusterSpec"], where)

    if kind == "RayCluster":
        cluster(doc["spec"], kind)
    elif kind == "RayJob":
        job(doc["spec"], kind)
    elif kind == "RayCronJob":
        fields = doc["spec"]["schedule"].split()
        ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
        if len(fields) != 5 or not all(
            f == "*" or (f.isdigit() and lo <= int(f) <= hi) for f, (lo, hi) in zip(fields, ranges)
        ):
            errors.append(f"schedule {doc['spec']['schedule']!r} (this check reads plain fields)")
        job(doc["spec"]["jobTemplate"], kind)
    return errors


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayCronJob"])
def test_manifest_passes_the_operators_own_checks(kind):
    assert operator_errors(by_kind()[kind]) == []


def test_operator_checks_catch_what_they_check():
    job = by_kind()["RayJob"]
    assert operator_errors(_with(job, "metadata", "name", "Nightly_Scoring"))
    assert operator_errors(_with(job, "spec", "shutdownAfterJobFinishes", False))
    head = "spec.rayClusterSpec.headGroupSpec"
    assert operator_errors(_with(job, head, "resources", {"CPU": "8"}))  # num-cpus is set too
    cluster = by_kind()["RayCluster"]
    assert operator_errors(_with(cluster, "spec", "rayVersion", "2.51.0"))
    cron = by_kind()["RayCronJob"]
    assert operator_errors(_with(cron, "spec", "schedule", "0 25 * * *"))


# --- what the manifests say -------------------------------------------------------------


def cluster_specs() -> dict[str, dict[str, Any]]:
    k = by_kind()
    return {
        "RayCluster": k["RayCluster"]["spec"],
        "RayJob": k["RayJob"]["spec"]["rayClusterSpec"],
        "RayCronJob": k["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def job_specs() -> dict[str, dict[str, Any]]:
    k = by_kind()
    return {"RayJob": k["RayJob"]["spec"], "RayCronJob": k["RayCronJob"]["spec"]["jobTemplate"]}


def quantity(q: str | int) -> float:
    """Bytes of a Kubernetes quantity (``96Gi``, ``32G``) or of a plain number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["RayCluster", "RayJob", "RayCronJob"])
def test_cpu_head_and_h100_workers_of_eight_gpus(name):
    spec = cluster_specs()[name]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head["resources"].get(part, {})
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [gpu] = spec["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == str(GPUS_PER_NODE)
    assert res["requests"] == res["limits"]  # the whole node, guaranteed
    assert pod["nodeSelector"]
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
    )


@pytest.mark.parametrize("name", ["RayCluster", "RayJob", "RayCronJob"])
def test_object_store_fits_in_a_memory_backed_dev_shm(name):
    for group in groups(cluster_specs()[name]):
        pod = group["template"]["spec"]
        [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [vol] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert vol["emptyDir"]["medium"] == "Memory"
        shm = quantity(vol["emptyDir"]["sizeLimit"])
        store = quantity(group["rayStartParams"]["object-store-memory"])
        assert store < shm
        assert shm <= quantity(pod["containers"][0]["resources"]["limits"]["memory"])


def test_job_clusters_are_the_long_lived_clusters_pods():
    """RayJob and RayCronJob start the same head and GPU pods as raycluster.yaml."""
    specs = cluster_specs()
    ref = specs.pop("RayCluster")
    for name, spec in specs.items():
        assert spec["rayVersion"] == ref["rayVersion"], name
        assert spec["headGroupSpec"] == ref["headGroupSpec"], name
        [gpu], [ref_gpu] = spec["workerGroupSpecs"], ref["workerGroupSpecs"]
        assert gpu["template"] == ref_gpu["template"], name
        assert gpu["rayStartParams"] == ref_gpu["rayStartParams"], name


def test_versions_are_the_ones_batchjobs_supports():
    ray = ".".join(map(str, SUPPORTED["ray"]))
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"].startswith(ray + "."), name
    vllm = ".".join(map(str, SUPPORTED["vllm"]))
    assert re.search(
        rf"ARG VLLM_IMAGE=vllm/vllm-openai:v{re.escape(vllm)}\.\d+\n", DOCKERFILE.read_text()
    )


@pytest.mark.parametrize("name", ["RayJob", "RayCronJob"])
def test_jobs_give_their_cluster_back_and_retry(name):
    job = job_specs()[name]
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["ttlSecondsAfterFinished"] <= 600  # the GPU node idles this long
    assert job["activeDeadlineSeconds"] > 0
    assert job["backoffLimit"] >= 1
    # the job's cluster is fixed: every GPU it plans on is there when it is submitted
    [gpu] = job["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]
    assert "enableInTreeAutoscaling" not in job["rayClusterSpec"]


def test_cron_attempts_all_start_on_the_day_they_score_the_day_before():
    """The entrypoint names yesterday's date when it starts: every attempt (the first plus
    backoffLimit retries, each at most activeDeadlineSeconds) must start before midnight UTC."""
    cron = by_kind()["RayCronJob"]["spec"]
    minute, hour, *rest = cron["schedule"].split()
    assert rest == ["*", "*", "*"] and cron["timeZone"] in ("Etc/UTC", "UTC")
    job = cron["jobTemplate"]
    last_start = (
        int(hour) * 3600 + int(minute) * 60 + job["backoffLimit"] * job["activeDeadlineSeconds"]
    )
    assert last_start < 24 * 3600


def test_long_lived_cluster_asks_its_clients_for_a_token():
    auth = by_kind()["RayCluster"]["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": auth["secretName"]} and auth["secretName"]


def env_entries() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, spec in cluster_specs().items():
        for group in groups(spec):
            for c in group["template"]["spec"]["containers"]:
                out += [(f"{name}/{c['name']}", e) for e in c.get("env", [])]
    return out


def test_credentials_come_from_a_secret_never_inline():
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
    named = [(where, e) for where, e in env_entries() if secretish.search(e["name"])]
    assert named, "the pods get object-store credentials"
    for where, e in named:
        assert "value" not in e, f"{where}: {e['name']} is inline"
        assert e["valueFrom"]["secretKeyRef"]["name"], where
    for path in CLUSTER.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_text(errors="replace")
            assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path  # an AWS access key id
            assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*\S{20,}", text), path


# --- entrypoints, images and paths ------------------------------------------------------


def dockerfile() -> dict[str, Any]:
    lines = DOCKERFILE.read_text().splitlines()
    workdir = [line.split()[1] for line in lines if line.startswith("WORKDIR ")]
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    return {"workdir": workdir[-1], "copied": [src for c in copies for src in c]}


def test_dockerfile_copies_files_that_exist_and_installs_the_gpu_extra():
    image = dockerfile()
    assert image["copied"]
    for src in image["copied"]:
        assert (REPO / src).exists(), src
    lines = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing but what is let through below
    for src in image["copied"]:
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "gpu" in project["optional-dependencies"] and '".[gpu]"' in DOCKERFILE.read_text()
    # the head serves the job API that RayJob's submitter and batchjobs submit talk to
    [ray] = [d for d in project["dependencies"] if re.match(r"ray\[", d)]
    assert "default" in re.search(r"\[(.*)\]", ray).group(1).split(",")


def test_one_image_everywhere():
    images = set()
    for spec in cluster_specs().values():
        for group in groups(spec):
            images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    images.add(yaml.safe_load(RAY_UP.read_text())["docker"]["image"])
    assert len(images) == 1, images
    [image] = images
    assert image in DOCKERFILE.read_text()  # the build command names it


def entrypoint_argv(entrypoint: str) -> list[str]:
    """The job's argv as KubeRay's submitter runs it: `/bin/bash -c "... -- <entrypoint>"`
    (ray job submit then quotes each word again, so the driver gets the same argv)."""
    out = subprocess.run(
        ["bash", "-c", 'printf "%s\\0" ' + entrypoint], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout.split("\0")[:-1]


@pytest.mark.parametrize("name", ["RayJob", "RayCronJob"])
def test_entrypoint_runs_a_shipped_spec_from_the_images_working_dir(name):
    job = job_specs()[name]
    argv = entrypoint_argv(job["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and scripts[argv[0]] == "batchjobs.cli:app"
    assert argv[1] == "run"
    spec = argv[2]
    assert not Path(spec).is_absolute() and (REPO / spec).is_file(), spec
    image = dockerfile()
    # relative paths resolve against the working dir: the repository as the image holds it
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": image["workdir"]}
    assert spec.split("/")[0] in [s.rstrip("/") for s in image["copied"]]
    if "$(date" in job["entrypoint"]:  # the shell filled in a date
        assert all(
            re.search(r"/\d{4}-\d{2}-\d{2}/", a)
            for a in argv
            if a.startswith(("input.", "output."))
        )


@pytest.mark.parametrize("name", ["RayJob", "RayCronJob"])
def test_job_spec_passes_batchjobs_validate_offline(name, monkeypatch):
    argv = entrypoint_argv(job_specs()[name]["entrypoint"])
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["validate", "--offline", *argv[2:]])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


@pytest.mark.parametrize("name", ["RayJob", "RayCronJob"])
def test_the_job_fits_its_cluster_and_finds_its_model(name, monkeypatch):
    job = job_specs()[name]
    argv = entrypoint_argv(job["entrypoint"])
    monkeypatch.chdir(REPO)
    sets = [v for k, v in zip(argv[3:], argv[4:]) if k in ("--set", "-s")]
    spec = load_spec(argv[2], sets, offline=True)
    [gpu] = job["rayClusterSpec"]["workerGroupSpecs"]
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert spec.gpus_per_replica() <= per_pod  # a replica on one node
    assert spec.resources.replicas * spec.gpus_per_replica() <= per_pod * gpu["replicas"]
    # the model directory is mounted on every pod: the driver checks it, the replicas load it
    for group in groups(job["rayClusterSpec"]):
        mounts = [
            m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]
        ]
        assert any(spec.engine.model.startswith(m.rstrip("/") + "/") for m in mounts), mounts


def test_ray_up_nodes_mount_and_fetch_the_specs_model(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec("jobs/nightly_scoring.yaml", offline=True)
    cfg = yaml.safe_load(RAY_UP.read_text())
    opts = " ".join(cfg["docker"]["run_options"])
    model_root = str(Path(spec.engine.model).parent)
    assert f"-v {model_root}:{model_root}:ro" in opts
    for name, node in cfg["available_node_types"].items():
        cmds = " ".join(node.get("initialization_commands", []))
        assert spec.engine.model in shlex.split(cmds), name


# --- the ray up config -------------------------------------------------------------------


def _ray_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_up_config_passes_rays_own_validation():
    cfg = yaml.safe_load(RAY_UP.read_text())
    prepared = _ray_validate(cfg)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "GPU" not in head["resources"]
    [(_, gpu)] = [(k, t) for k, t in types.items() if k != prepared["head_node_type"]]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]


@pytest.mark.parametrize(
    "path, key",
    [("", "idle_timeout_minute"), ("available_node_types.h100", "min_worker"), ("docker", "imag")],
)
def test_rays_validation_rejects_a_misspelt_key(path, key):
    import jsonschema as js

    cfg = _with(yaml.safe_load(RAY_UP.read_text()), path, key, 1)
    with pytest.raises(js.ValidationError, match=key):
        _ray_validate(cfg)


# --- validate --offline ------------------------------------------------------------------


def test_offline_validate_reaches_no_input_output_or_model(spec_dict, write_yaml, tmp_path):
    spec_dict["input"]["path"] = "memory://nowhere/in/*.parquet"
    online = CliRunner().invoke(app, ["validate", str(write_yaml(spec_dict))])
    assert online.exit_code == 3, online.output  # the input was looked for
    spec_dict["engine"]["model"] = str(tmp_path / "no-such-model")
    offline = CliRunner().invoke(app, ["validate", "--offline", str(write_yaml(spec_dict))])
    assert offline.exit_code == 0, offline.output
    assert "offline (input, output and model not reached)" in offline.output


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("input", "s4://bucket/x/*.parquet", "unknown URL scheme 's4'"),
        ("input", "s3:///x/*.parquet", "no bucket or host after s3://"),
        ("output", "gs://bucket/out/*/", "an output root cannot be a glob"),
        ("output", "simplecache::nope://b/x", "unknown URL scheme 'nope'"),
    ],
)
def test_offline_validate_checks_locations_by_their_form(
    spec_dict, write_yaml, key, value, message
):
    spec_dict[key]["path"] = value
    result = CliRunner().invoke(app, ["validate", "--offline", str(write_yaml(spec_dict))])
    assert result.exit_code == 2 and message in result.output, result.output


def test_offline_validate_still_checks_the_spec(spec_dict, write_yaml):
    spec_dict["resources"] = {"replicas": 0}
    result = CliRunner().invoke(app, ["validate", "--offline", str(write_yaml(spec_dict))])
    assert result.exit_code == 2 and "resources.replicas" in result.output
