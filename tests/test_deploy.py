"""deploy/: the Kubernetes recipe, checked offline (no cluster, no network).

Kubernetes objects are validated with kubernetes_validate in strict mode (unknown fields fail) against the newest
schema it ships. The step pods of the real GPU assets are built by dagster_k8s itself, from the same layers the
k8s_job_executor merges on a cluster: the run launcher's runK8sConfig, the code server's config
(includeConfigInLaunchedRuns) and the asset's ``dagster-k8s/config`` op tag.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job,
                             get_user_defined_k8s_config)
from kubernetes.utils import parse_quantity
from kubernetes_validate.utils import latest_version

from attrface_pipeline.config import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
MANIFESTS = ("storage.yaml", "attrface-config.yaml", "vllm.yaml")
K8S_VERSION = latest_version()
GPU_ASSETS = {"face_attributes", "edits", "qc", "a2bfr_lora", "roboface_stage1", "roboface_model", "eval_report",
              "a2bfr_eval", "roboface_eval", "baseline_eval", "text_embeddings", "gt_latents",
              "roboface_text_embeddings"}
TRAINING_ASSETS = {"a2bfr_lora": "a2bfr", "roboface_stage1": "roboface", "roboface_model": "roboface"}


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for name in MANIFESTS for d in _documents(name)}


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


@pytest.fixture(scope="module")
def deployment(values) -> dict:
    (dep,) = values["dagster-user-deployments"]["deployments"]
    return dep


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """The ConfigMap's attrface.yaml as a file, as the pods see it at $ATTRFACE_CONFIG."""
    path = tmp_path_factory.mktemp("configmap") / "attrface.yaml"
    path.write_text(_objects()["ConfigMap", "attrface-config"]["data"]["attrface.yaml"])
    return path


@pytest.fixture(scope="module")
def code_location(config_file) -> dict:
    """What the code server sees, from one subprocess with ATTRFACE_EXECUTOR=k8s and ATTRFACE_CONFIG set to the
    ConfigMap's file (the executor and the training GPU counts are fixed when definitions.py is imported): the
    config as the project's loader reads it, each asset's op tags and pool, each job's executor."""
    script = """if True:
        import json, sys
        from attrface_pipeline.config import load_config
        from attrface_pipeline.definitions import defs
        assets = {}
        for key in defs.resolve_asset_graph().get_all_asset_keys():
            op = defs.resolve_assets_def(key).op
            assets[key.to_user_string()] = {"tags": dict(op.tags), "pool": op.pool}
        executors = {job.name: job.executor_def.name for job in defs.resolve_all_job_defs()}
        config = load_config(files=[sys.argv[1]]).model_dump(mode="json")
        print(json.dumps({"assets": assets, "executors": executors, "config": config}))
    """
    env = {**os.environ, "ATTRFACE_EXECUTOR": "k8s", "ATTRFACE_CONFIG": str(config_file)}
    out = subprocess.run([sys.executable, "-c", script, str(config_file)], env=env, cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cfg(code_location) -> dict:
    """The ConfigMap's attrface.yaml through attrface_pipeline.config.load_config (from a temp file)."""
    return code_location["config"]


# -- plain manifests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [pytest.param(d, id=f"{name}:{d['kind']}/{d['metadata']['name']}")
                                 for name in MANIFESTS for d in _documents(name)])
def test_manifest_validates_strictly(obj):
    _validate(obj)


def test_strict_validation_rejects_an_unknown_field():
    broken = copy.deepcopy(_objects()["Deployment", "attrface-verbalizer"])
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_volumes_are_read_write_many_claims():
    objects = _objects()
    for name in ("attrface-data", "attrface-models"):
        assert objects["PersistentVolumeClaim", name]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("server", ["attrface-verbalizer", "attrface-judge"])
def test_vllm_server_gets_a_gpu_and_the_shared_model_cache(server):
    objects = _objects()
    pod = objects["Deployment", server]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/models/hf"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: claims.get(m["name"]) for m in container["volumeMounts"]}
    assert mounts["/models"] == "attrface-models"
    service, template = objects["Service", server]["spec"], objects["Deployment", server]["spec"]["template"]
    assert service["selector"].items() <= template["metadata"]["labels"].items()
    assert [p["port"] for p in service["ports"]] == [8000]


# -- the pipeline config in the ConfigMap ---------------------------------------------------------------------------

def _served_by(url: str) -> str:
    """The model the Service behind ``url`` serves (its vLLM Deployment's first argument)."""
    objects = _objects()
    parsed = urlparse(url)
    service = objects["Service", parsed.hostname]["spec"]
    assert parsed.port in [p["port"] for p in service["ports"]] and parsed.path == "/v1"
    (deployment,) = [d for (kind, _), d in objects.items() if kind == "Deployment"
                     and service["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_configmap_config_loads_and_points_at_the_vllm_services(cfg):
    assert cfg["profile"] == "full"
    assert cfg["paths"]["data_root"] == "/data/attrface" and cfg["paths"]["cache_dir"] == "/models"
    assert cfg["paths"]["data_url"] is None  # a shared volume here; an s3:// data root is the documented switch
    vllm, judge, roboface = cfg["verbalize"]["vllm"], cfg["eval"]["judge"], cfg["roboface"]
    assert _served_by(vllm["base_url"]) == vllm["model"] == "Qwen/Qwen3-8B"
    assert _served_by(judge["base_url"]) == judge["model"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert _served_by(roboface["caption_base_url"]) == roboface["caption_model"]
    assert cfg["a2bfr"]["num_processes"] == roboface["num_processes"] == 8
    assert cfg["models"]["allow_download"] is False


def test_vllm_reads_the_pipeline_hub_cache(cfg):
    hub = f"{cfg['paths']['cache_dir']}/hub"
    for server in ("attrface-verbalizer", "attrface-judge"):
        (container,) = _objects()["Deployment", server]["spec"]["template"]["spec"]["containers"]
        assert {e["name"]: e["value"] for e in container["env"]}["HF_HUB_CACHE"] == hub


# -- values.yaml ------------------------------------------------------------------------------------------------

def test_values_kubernetes_fragments_validate_in_a_pod(values, deployment):
    container = {"name": "dagster", "image": f"{deployment['image']['repository']}:{deployment['image']['tag']}",
                 "env": deployment["env"], "envFrom": [{"secretRef": s} for s in deployment["envSecrets"]],
                 "volumeMounts": deployment["volumeMounts"], "resources": deployment["resources"]}
    run_container = {"name": "run", "image": container["image"],
                     **values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]}
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "attrface-code-server"},
               "spec": {"containers": [container, run_container], "volumes": deployment["volumes"]}})


def test_values_wire_the_code_server_to_the_manifests(values, deployment, cfg):
    objects = _objects()
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["ATTRFACE_EXECUTOR"] == "k8s" and env["HF_HUB_OFFLINE"] == "1"
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "attrface_pipeline.definitions"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    volumes = {v["name"]: v for v in deployment["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in deployment["volumeMounts"]}
    # $ATTRFACE_CONFIG is the ConfigMap's key, mounted from the ConfigMap in deploy/attrface-config.yaml.
    config_dir, key = env["ATTRFACE_CONFIG"].rsplit("/", 1)
    assert key in objects["ConfigMap", mounts[config_dir]["configMap"]["name"]]["data"]
    # The data root and the model cache lie on the two ReadWriteMany claims.
    for path, claim in ((cfg["paths"]["data_root"], "attrface-data"), (cfg["paths"]["cache_dir"], "attrface-models")):
        (mount,) = [m for m in mounts if Path(path).is_relative_to(m) and "persistentVolumeClaim" in mounts[m]]
        assert mounts[mount]["persistentVolumeClaim"]["claimName"] == claim
        assert ("PersistentVolumeClaim", claim) in objects


def test_values_hold_no_password_and_one_run_limit(values):
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["global"]["postgresqlSecretName"] == "dagster-postgresql-secret"
    # dagster refuses an instance with a run limit both in the run coordinator and under `concurrency`.
    queued = values["dagsterDaemon"]["runCoordinator"].get("config", {}).get("queuedRunCoordinator", {})
    assert "maxConcurrentRuns" not in queued and values["concurrency"]["runs"]["maxConcurrentRuns"] >= 1
    assert values["concurrency"]["enabled"] is True and values["concurrency"]["pools"]["defaultLimit"] >= 1


# -- the real assets' GPU op tags and the step pods built from them ----------------------------------------------------

def test_code_location_uses_the_k8s_executor(code_location):
    # reproduce only launches the other jobs' runs (each on the k8s executor), in its run worker
    assert code_location["executors"].pop("reproduce") == "in_process"
    assert set(code_location["executors"].values()) == {"k8s"}
    assert {"build_dataset", "build_dataset_chunk", "train_a2bfr", "a2bfr_experiment"} <= set(
        code_location["executors"])


def _gpu_tag(tags: dict) -> dict:
    return json.loads(tags["dagster-k8s/config"])


def test_gpu_assets_carry_a_gpu_tag(code_location, cfg):
    assets = code_location["assets"]
    tagged = {name for name, a in assets.items() if "dagster-k8s/config" in a["tags"]}
    assert tagged == GPU_ASSETS == {name for name, a in assets.items() if a["pool"] == "gpu"}
    for name in GPU_ASSETS:
        requests = _gpu_tag(assets[name]["tags"])["container_config"]["resources"]["requests"]
        expected = cfg[TRAINING_ASSETS[name]]["num_processes"] if name in TRAINING_ASSETS else 1
        assert int(requests["nvidia.com/gpu"]) == expected >= 1, name


def _step_job(values: dict, deployment: dict, tags: dict) -> dict:
    """The Kubernetes Job the k8s_job_executor launches for a step with these op tags (dagster_k8s's own merge)."""
    launcher = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
        {"container_config": values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]}))
    code_server = K8sContainerContext(env=deployment["env"], env_secrets=[s["name"] for s in deployment["envSecrets"]],
                                      volumes=deployment["volumes"], volume_mounts=deployment["volumeMounts"],
                                      resources=deployment["resources"])
    step = launcher.merge(code_server).merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image=image, dagster_home="/opt/dagster/dagster_home",
                            instance_config_map="attrface-dagster-instance",
                            postgres_password_secret=values["global"]["postgresqlSecretName"]),
        ["dagster", "api", "execute_step"], "dagster-step-0123456789abcdef",
        user_defined_k8s_config=step.run_k8s_config, component="step_worker")
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def _resource_problems(resources: dict) -> list[str]:
    """What the API server would reject or the scheduler mis-place: a request above its limit, a GPU limit unlike
    its request."""
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    problems = [f"{k}: request {requests[k]} above limit {limits[k]}" for k in set(requests) & set(limits)
                if parse_quantity(requests[k]) > parse_quantity(limits[k])]
    if str(requests.get("nvidia.com/gpu")) != str(limits.get("nvidia.com/gpu")):
        problems.append("nvidia.com/gpu: request and limit differ")
    return problems


def test_gpu_step_pods_validate_and_are_schedulable(code_location, values, deployment):
    for name in sorted(GPU_ASSETS):
        job = _step_job(values, deployment, code_location["assets"][name]["tags"])
        _validate(job)
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert _resource_problems(container["resources"]) == [], name
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert {"/data", "/models", "/etc/attrface", "/dev/shm"} <= {m["mountPath"] for m in container["volumeMounts"]}


def test_an_inherited_memory_limit_is_caught(code_location, values, deployment):
    """A memory limit on the code server reaches every step pod and undercuts a GPU step's request."""
    limited = copy.deepcopy(deployment)
    limited["resources"]["limits"] = {"memory": "8Gi"}
    job = _step_job(values, limited, code_location["assets"]["edits"]["tags"])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert _resource_problems(container["resources"]) == ["memory: request 64Gi above limit 8Gi"]
