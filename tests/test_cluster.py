"""Cluster deployment (cluster/): the manifests parse and name real jobs with flags those jobs
accept; the sizing table is the script's output; and the job chain prepare_data -> train ->
upscale runs through `ray job submit` on a local head that the test starts and stops."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import io
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAYJOBS = {"prepare_data": "rayjob-prepare-data.yaml", "caption": "rayjob-caption.yaml",
           "train": "rayjob-train.yaml", "upscale": "rayjob-upscale.yaml"}
GPU = "nvidia.com/gpu"

# Field names of the KubeRay ray.io/v1 types (ray-operator/apis/ray/v1/raycluster_types.go and
# rayjob_types.go): a misspelt key is silently dropped by the API server, so it is caught here.
RAYCLUSTER_SPEC_KEYS = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec",
                        "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                   "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                     "numOfHosts"}
AUTOSCALER_KEYS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                   "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                    "shutdownAfterJobFinishes", "suspend", "schedule"}
# Ray's runtime_env fields used by this project (ray.runtime_env.RuntimeEnv accepts these).
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "pip", "uv", "conda", "py_modules",
                    "image_uri", "container", "config", "nsight", "py_executable"}


# ---- helpers -------------------------------------------------------------------------------------
def load_docs(path: Path) -> List[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def the_raycluster() -> dict:
    (cluster,) = [d for d in load_docs(KUBERAY / "raycluster.yaml") if d.get("kind") == "RayCluster"]
    return cluster


def pyproject_pins() -> Dict[str, str]:
    """name (with extras) -> exact version, for the `==` pins of pyproject's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.\-\[\],]+)==([^"]+)"', text)}


def containers(pod_template: dict) -> List[dict]:
    return pod_template["spec"]["containers"]


def gpus_per_pod(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in containers(group["template"]))


def check_raycluster_spec(spec: dict, where: str) -> None:
    """The structural rules of a RayClusterSpec (a RayCluster's, or a RayJob's rayClusterSpec)."""
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{where}: unknown spec keys {set(spec) - RAYCLUSTER_SPEC_KEYS}"
    assert spec["rayVersion"] == pyproject_pins()["ray[default,train,data]"], f"{where}: rayVersion"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_KEYS, where
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS, f"{where}: unknown headGroupSpec keys {set(head) - HEAD_GROUP_KEYS}"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    for group in [head, *groups]:
        params = group["rayStartParams"]
        assert isinstance(params, dict), where
        # KubeRay's rayStartParams is map[string]string: a bare number or bool is rejected.
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
        for c in containers(group["template"]):
            assert c["name"] and c["image"], f"{where}: container without name or image"
            requests, limits = c["resources"].get("requests", {}), c["resources"]["limits"]
            assert "cpu" in limits and "memory" in limits, f"{where}: {c['name']} needs cpu/memory limits"
            assert str(requests.get(GPU, limits.get(GPU, 0))) == str(limits.get(GPU, 0)), \
                f"{where}: GPU requests must equal limits"
    assert gpus_per_pod(head) == 0, f"{where}: the head should be CPU only"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate group names"
    for g in groups:
        assert set(g) <= WORKER_GROUP_KEYS, f"{where}: unknown keys in {g['groupName']}: {set(g) - WORKER_GROUP_KEYS}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], \
            f"{where}: {g['groupName']} needs minReplicas <= replicas <= maxReplicas"
    assert any(gpus_per_pod(g) > 0 for g in groups), f"{where}: no worker group requests {GPU}"
    for g in groups:
        if gpus_per_pod(g):
            tolerated = {t.get("key") for t in g["template"]["spec"].get("tolerations", [])}
            assert GPU in tolerated, f"{where}: GPU group {g['groupName']} does not tolerate the {GPU} taint"
    images = {c["image"] for grp in [head, *groups] for c in containers(grp["template"])}
    assert len(images) == 1, f"{where}: one image for head and workers, got {images}"


def split_entrypoint(entrypoint: str) -> Tuple[str, List[str]]:
    """`python -m jobs.<name> ARGS` -> ("jobs.<name>", ARGS)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"not `python -m jobs.X ...`: {entrypoint!r}"
    return argv[2], argv[3:]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def job_parser(module_name: str) -> Optional[argparse.ArgumentParser]:
    """The job's own argparse parser: `jobs.common.job_parser` when the module has the jobs'
    command-line shape (`add_options`), else the parser its `main(argv)` builds (captured when it
    parses). None when neither works; the caller then falls back to `--help`."""
    from jobs.common import job_parser as parser_of

    module = importlib.import_module(module_name)
    if hasattr(module, "add_options"):
        return parser_of(module_name.rsplit(".", 1)[-1].replace("_", "-"), module)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            module.main([])
        except _Captured as c:
            return c.parser
        except (Exception, SystemExit):
            return None
    return None


def help_flags(module_name: str) -> set:
    out = subprocess.run([sys.executable, "-m", module_name, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout))


def check_job_command(module_name: str, args: List[str], where: str) -> argparse.Namespace:
    """The module exists under jobs/ and its own parser accepts `args`; returns the namespace
    (or, for a job whose parser cannot be reached, checks the flags against its --help)."""
    assert importlib.util.find_spec(module_name) is not None, f"{where}: no module {module_name} in jobs/"
    parser = job_parser(module_name)
    if parser is None:
        unknown = {a.split("=")[0] for a in args if a.startswith("--")} - help_flags(module_name)
        assert not unknown, f"{where}: {module_name} does not accept {sorted(unknown)}"
        return argparse.Namespace()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: {module_name} rejects its arguments: {stderr.getvalue().strip()[-500:]}")
    module = importlib.import_module(module_name)
    if hasattr(module, "config_from_args"):  # the job's own validation (config keys, choices)
        try:
            module.config_from_args(ns)
        except ValueError as err:
            pytest.fail(f"{where}: {module_name} rejects its configuration: {err}")
    return ns


def rayjob_docs() -> Dict[str, dict]:
    out = {}
    for job, file in RAYJOBS.items():
        (doc,) = load_docs(KUBERAY / file)
        out[job] = doc
    return out


# ---- manifests -----------------------------------------------------------------------------------
def test_raycluster_structure():
    cluster = the_raycluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    check_raycluster_spec(spec, "raycluster.yaml")
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus_per_pod(g)]
    assert all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), "GPU groups should autoscale"
    # Every PVC a pod mounts is defined next to the cluster.
    claims = {d["metadata"]["name"] for d in load_docs(KUBERAY / "raycluster.yaml")
              if d["kind"] == "PersistentVolumeClaim"}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for volume in group["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("job", sorted(RAYJOBS))
def test_rayjob_structure_and_entrypoint(job):
    doc = rayjob_docs()[job]
    where = RAYJOBS[job]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob", where
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"{where}: unknown RayJob keys {set(spec) - RAYJOB_SPEC_KEYS}"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{where}: rayClusterSpec xor clusterSelector"
    if "clusterSelector" in spec:
        assert spec["clusterSelector"] == {"ray.io/cluster": the_raycluster()["metadata"]["name"]}, where
        cluster_spec = the_raycluster()["spec"]
    else:
        cluster_spec = spec["rayClusterSpec"]
        check_raycluster_spec(cluster_spec, where)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RUNTIME_ENV_KEYS, where
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values()), f"{where}: env_vars must be strings"
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["env_vars"]
    assert {k: runtime_env["env_vars"].get(k) for k in shared} == shared, \
        f"{where}: env_vars differ from cluster/runtime_env.yaml"

    module, args = split_entrypoint(spec["entrypoint"])
    assert module == f"jobs.{job}", where
    ns = check_job_command(module, args, where)

    # The job asks for no more GPUs than the cluster can have.
    max_gpus = sum(g["maxReplicas"] * gpus_per_pod(g) for g in cluster_spec["workerGroupSpecs"])
    if job == "train":
        assert ns.use_gpu is True and ns.num_workers >= 2, f"{where}: multi-worker GPU training"
        fixed = [g for g in cluster_spec["workerGroupSpecs"] if gpus_per_pod(g)]
        assert sum(g["replicas"] for g in fixed) >= 2, f"{where}: training should span several nodes"
        assert ns.num_workers == sum(g["replicas"] * gpus_per_pod(g) for g in fixed), \
            f"{where}: --num-workers should equal the GPUs of the worker pods"
    if job in ("caption", "upscale"):
        assert ns.num_gpus >= 1 and ns.pool_size * ns.num_gpus <= max_gpus, f"{where}: pool needs more GPUs"


# Entrypoints that run on a local Ray by design, with the reason.
LOCAL_ONLY = {"demo": "issue 9: the embedded demo runs on a local Ray started in-process",
              "export": "no Ray: it exports one checkpoint in the calling process"}


def job_modules() -> List[str]:
    """Every cluster job entrypoint in jobs/ (modules with a main, less LOCAL_ONLY)."""
    names = sorted(p.stem for p in (ROOT / "jobs").glob("*.py")
                   if p.stem not in ("__init__", "common", "cli", *LOCAL_ONLY))
    return [f"jobs.{n}" for n in names if "def main(" in (ROOT / "jobs" / f"{n}.py").read_text()]


@pytest.mark.parametrize("module", job_modules())
def test_every_job_takes_address(module):
    """Issue 8: every job takes --address (else $RAY_ADDRESS, else a local Ray)."""
    parser = job_parser(module)
    flags = ({o for a in parser._actions for o in a.option_strings} if parser is not None else help_flags(module))
    assert "--address" in flags, f"{module} has no --address flag"


def test_runtime_env():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS
    assert env["working_dir"] == "."
    assert any(e.strip("/") == ".venv" for e in env["excludes"]), "the local venv must not be uploaded"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "HF_HOME" in env["env_vars"]
    assert "pip" not in env, "torch comes from the image or the setup commands, not per job"


def test_launcher_yaml():
    cfg = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"]) >= cfg["max_workers"] // 2
    setup = "\n".join(cfg["setup_commands"])
    pins = pyproject_pins()
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={pins[pkg]}" in setup, f"setup commands must pin {pkg} as pyproject.toml"
    assert "flowsr[cloud]" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert any("boto3" in c for c in cfg.get("head_setup_commands", [])), "the AWS autoscaler needs boto3"


# ---- manifests against the real schemas ----------------------------------------------------------
DATA = Path(__file__).resolve().parent / "data"


def crd_schema(name: str) -> dict:
    """The openAPIV3Schema of KubeRay's CRD `name` (tests/data, vendored from KubeRay v1.7.0) as a
    JSON schema. The API server prunes unknown fields silently, so objects with declared
    properties get `additionalProperties: false` here (a typo fails instead of vanishing), and
    OpenAPI's `nullable` becomes a "null" type."""
    crd = json.loads((DATA / f"ray.io_{name}.json").read_text())
    assert "v1.7.0" in crd["metadata"]["annotations"]["source-commit"]

    def convert(node):
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: (({p: convert(v) for p, v in node[k].items()}) if k == "properties" else convert(node[k]))
               for k in node if not k.startswith("x-kubernetes-") or k == "x-kubernetes-int-or-string"}
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    (version,) = crd["spec"]["versions"]
    return convert(version["schema"]["openAPIV3Schema"])


def schema_errors(schema: dict, doc: dict) -> List[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def test_kuberay_manifests_validate_against_the_crds():
    clusters, jobs = crd_schema("rayclusters"), crd_schema("rayjobs")
    docs = [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]
    checked = 0
    for where, doc in docs:
        schema = {"RayCluster": clusters, "RayJob": jobs}.get(doc["kind"])
        if schema is not None:
            assert doc["apiVersion"] == "ray.io/v1", where
            assert not schema_errors(schema, doc), f"{where}: {schema_errors(schema, doc)[:5]}"
            checked += 1
    assert checked == 1 + len(RAYJOBS)
    # the schemas can fail: a misspelt field, a wrong type, a missing required field
    cluster = the_raycluster()
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in e for e in schema_errors(clusters, bad))
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert schema_errors(clusters, bad)
    bad = json.loads(json.dumps(cluster))
    del bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    assert schema_errors(clusters, bad)


def test_launcher_yaml_validates_against_rays_schema():
    """cluster/launcher/aws.yaml against the cluster-launcher schema Ray itself validates with
    (ray/autoscaler/ray-schema.json of the installed Ray)."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    assert not schema_errors(schema, cfg), schema_errors(schema, cfg)[:5]
    bad = {**cfg, "max_worker": 3}
    assert schema_errors(schema, bad)


def test_dockerfile_pins_match_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    pins = pyproject_pins()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    for name in ("torch", "torchvision", "ray[default,train,data]"):
        assert f'"{name}=={pins[name]}"' in text, f"Dockerfile must pin {name}=={pins[name]}"
    assert "wget" in text, "KubeRay's health probes call wget"
    copied = set(re.findall(r"^COPY .* (\S+)/?$", text, re.M))
    assert any("flowsr/jobs" in c for c in copied) and any("flowsr/pipeline" in c for c in copied)


def test_readme_submit_commands_parse():
    """Every `python -m jobs.X ...` in cluster/README.md's shell blocks parses with the job's parser."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m jobs." in line:
                commands.append("python -m jobs." + line.split("python -m jobs.", 1)[1])
    found = {split_entrypoint(c)[0] for c in commands}
    assert {f"jobs.{j}" for j in RAYJOBS} <= found, f"README lacks a submit command for {set(RAYJOBS) - found}"
    for c in commands:
        module, args = split_entrypoint(c)
        check_job_command(module, args, f"README: {c[:60]}")


# ---- sizing --------------------------------------------------------------------------------------
def load_sizing():
    spec = importlib.util.spec_from_file_location("cluster_sizing", CLUSTER / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_sizing_closed_forms():
    """The sizing arithmetic against numbers worked out by hand from the anchors (57 captions/s,
    2 captions/pair, 47 img/s, 0.24 s / 0.39 s stage-1 steps at batch 4 / 8, stage 2 = 35/12 x,
    30.6M LoRA params, 25 GB/s ring, 80% utilisation, 24 h deadline, 8 GPUs/node)."""
    s = load_sizing()
    f = s.FIGURES
    # caption 10^8 pairs: 1e8 * 2 / 57 / 0.8 / 3600 = 1218.32 GPU-h -> ceil(1218.32 / 24) = 51 GPUs, 7 nodes
    row = s.caption_row(10**8, f)
    assert math.isclose(row["gpu_hours"], 1218.3236, rel_tol=1e-6)
    assert (row["gpus"], row["nodes"]) == (51, 7) and math.isclose(row["wall_h"], 1218.3236 / 51, rel_tol=1e-6)
    assert s.caption_row(10**6, f)["gpus"] == 1  # 12.18 GPU-h fit one GPU's day
    assert s.caption_row(10**7, f)["gpus"] == 6  # 121.8 GPU-h: 5.08 GPU-days round up to 6 GPUs
    # upscale 10^9 images: 1e9 / 47 / 0.8 / 3600 = 7387.71 GPU-h -> 308 GPUs on 39 nodes
    up = s.upscale_row(10**9, f)
    assert math.isclose(up["gpu_hours"], 7387.7069, rel_tol=1e-6) and (up["gpus"], up["nodes"]) == (308, 39)
    # training, 1 GPU at batch 16: step = 0.09 + 0.0375 * 16 = 0.69 s, stage 2 0.69 * 35 / 12 = 2.0125 s;
    # (10k * 0.69 + 20k * 2.0125) / 0.8 / 3600 = 16.3715 h
    one = s.train_row(1, f)
    assert math.isclose(one["stage1_s"], 0.69) and math.isclose(one["stage2_s"], 2.0125)
    assert math.isclose(one["wall_h"], 16.371528, rel_tol=1e-6) and one["nodes"] == 1
    # 8 GPUs at batch 2 each: 0.09 + 0.075 s plus a ring all-reduce of 4 * 30.6M bytes,
    # 2 * 7/8 * 122.4 MB / 25 GB/s = 8.568 ms, on every step of both stages
    eight = s.train_row(8, f)
    assert math.isclose(eight["stage1_s"], 0.173568) and math.isclose(eight["stage2_s"], 0.489818)
    assert math.isclose(eight["wall_h"], 4.0041806, rel_tol=1e-6)
    assert math.isclose(eight["gpu_hours"], 8 * 4.0041806, rel_tol=1e-6)
    assert all(fig.kind in {"anchor", "measured", "paper", "estimate", "assumption"} for fig in f.values())


def test_readme_sizing_table_is_current():
    """cluster/README.md holds exactly what `python cluster/sizing.py` prints now."""
    text = (CLUSTER / "README.md").read_text()
    between = re.search(r"<!-- sizing:begin -->\n(.*?)\n<!-- sizing:end -->", text, re.S)
    assert between, "README lacks the <!-- sizing:begin/end --> markers"
    assert between.group(1).strip() == load_sizing().render().strip(), \
        "README's sizing table is stale: run `python cluster/sizing.py` and paste its output"


# ---- local cluster chain -------------------------------------------------------------------------
CHAIN_JOBS = ("prepare_data", "train", "upscale")


def free_ports(n: int) -> List[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_env(tmp: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    bindir = str(Path(sys.executable).parent)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PATH=bindir + os.pathsep + env.get("PATH", ""),
               HOME=env.get("HOME", str(tmp)))
    return env


def processes_of(temp_dir: str):
    """Every process of the Ray node rooted at `temp_dir`: those whose command line names it
    (gcs_server, raylet, dashboard, monitors) and all their descendants (workers, agents,
    job drivers)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or ()):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except psutil.Error:
            continue
    return list(found.values())


def stop_local_head(temp_dir: str, timeout: float = 20.0) -> None:
    """`ray stop`, scoped to the node this test started. Plain `ray stop` would end every Ray
    process of the machine (other users' and other tests' too): this ends only the processes
    rooted at our --temp-dir, SIGTERM first, SIGKILL after `timeout`."""
    import psutil

    procs = processes_of(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def local_head(tmp_path):
    """A Ray head started with `ray start --head` on free loopback ports, token auth disabled;
    yields (dashboard address, env); stopped (only its own processes) in a finally block."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are bounded
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, nm, om = free_ports(9)
    env = ray_env(tmp_path)
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", "--num-cpus=4",
           f"--object-store-memory={1 << 30}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_local_head(temp_dir)
        leftover = processes_of(temp_dir)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the test's Ray head survived: {[p.pid for p in leftover]}"


def submit(address: str, env: Dict[str, str], runtime_env: Path, entrypoint: List[str], timeout: int) -> str:
    """`ray job submit` from the repository root (its checkout as working_dir); returns the log."""
    module, args = entrypoint[2], entrypoint[3:]
    check_job_command(module, args, "chain")  # the same flag check the manifests get
    start = time.time()
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--runtime-env", str(runtime_env), "--working-dir", str(ROOT), "--log-style", "record", "--", *entrypoint]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, f"{module} failed (exit {out.returncode}):\n{log[-6000:]}"
    print(f"{module}: submitted and finished in {time.time() - start:.0f} s")
    return log


def write_inputs(directory: Path, names, size=None) -> List[Path]:
    import skimage.data
    from PIL import Image

    directory.mkdir(parents=True)
    paths = []
    for name in names:
        image = Image.fromarray(getattr(skimage.data, name)())
        if size:
            image = image.resize(size, Image.BICUBIC)
        paths.append(directory / f"{name}.png")
        image.save(paths[-1])
    return paths


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_job_chain_on_local_head(local_head, tmp_path):
    """prepare_data -> train (pixel-small, stage 1 then 2, two steps each) -> upscale, each one
    submitted with `ray job submit` to a local head, with cluster/runtime_env.yaml."""
    missing = [j for j in CHAIN_JOBS if importlib.util.find_spec(f"jobs.{j}") is None]
    if missing:
        pytest.fail(f"the chain needs jobs that do not exist yet: {', '.join(f'jobs/{j}.py' for j in missing)}")
    address, env = local_head
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    cache = tmp_path / "cache"
    runtime_env["env_vars"].update(HF_HOME=str(cache / "hf"), TORCH_HOME=str(cache / "torch"),
                                   TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    runtime_env_file = tmp_path / "runtime_env.yaml"
    runtime_env_file.write_text(yaml.safe_dump(runtime_env))
    start = time.time()

    images = write_inputs(tmp_path / "images", ["astronaut", "coffee", "chelsea", "rocket"])
    data = tmp_path / "data"
    submit(address, env, runtime_env_file,
           ["python", "-m", "jobs.prepare_data", "--input", str(tmp_path / "images"), "--output", str(data),
            "--patch-size", "64", "--crops-per-image", "2", "--shard-rows", "4", "--seed", "0"], timeout=240)
    shards = sorted((data / "shards").glob("*.parquet"))
    manifest = json.loads((data / "manifest.json").read_text())
    assert shards and manifest["total_rows"] == 2 * len(images)

    runs = tmp_path / "runs"
    submit(address, env, runtime_env_file,
           ["python", "-m", "jobs.train", "--config", "pixel-small", "--data", str(data / "shards"),
            "--stage", "all", "--storage-path", str(runs), "--name", "chain", "--num-workers", "1", "--no-use-gpu",
            "--set", "optim.batch_size=4", "--set", "optim.warmup_steps=0", "--set", "optim.stage1_steps=2",
            "--set", "optim.stage2_steps=2", "--set", "train.checkpoint_every=2", "--set", "train.val_every=100"],
           timeout=300)
    run = runs / "chain"
    assert (run / "config.json").exists()
    for stage in (1, 2):
        assert (run / f"stage{stage}" / "checkpoint_step0000002" / "config.json").exists(), f"no stage-{stage} checkpoint"
        assert (run / "metrics" / f"stage{stage}.csv").exists()
    checkpoint = run / "stage2" / "checkpoint_step0000002"

    lr = write_inputs(tmp_path / "lr", ["astronaut", "coffee"], size=(32, 24))
    out = tmp_path / "upscaled"
    submit(address, env, runtime_env_file,
           ["python", "-m", "jobs.upscale", "--input", str(tmp_path / "lr"), "--output", str(out),
            "--checkpoint", str(checkpoint), "--num-gpus", "0", "--batch-size", "2", "--scale", "4"], timeout=240)
    from PIL import Image

    for path in lr:
        with Image.open(out / path.name) as im:
            assert im.size == (128, 96)
    import pyarrow.parquet as pq

    statuses = pq.read_table(out / "manifest.parquet").column("status").to_pylist()
    assert statuses == ["ok"] * len(lr)
    print(f"chain: {time.time() - start:.0f} s after the head started")
