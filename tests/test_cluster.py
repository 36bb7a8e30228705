"""cluster/: launcher YAMLs checked with Ray's own validation, KubeRay
manifests, and `biflow cluster render` (offline, seconds)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"

JOB_FILES = {"jobs/quickstart.yaml", "jobs/smoke.yaml", "jobs/imagenet64-forward.yaml",
             "jobs/imagenet256-b2-forward.yaml", "jobs/imagenet256-b2-reverse.yaml",
             "jobs/imagenet256-xl2-forward.yaml", "jobs/imagenet256-latent-b2-forward.yaml"}

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


def test_aws_nodes_imdsv2_encrypted_disks_private_workers():
    cfg = load("aws.yaml")
    assert cfg["provider"]["cache_stopped_nodes"] is False
    for tname, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", tname
        assert all(b["Ebs"]["Encrypted"] is True for b in nc["BlockDeviceMappings"]), tname
        assert nc["ImageId"] == "{{ami_id}}"
        if tname == "head":
            assert nc["IamInstanceProfile"]["Arn"] == "{{head_instance_profile_arn}}"
            (nic,) = nc["NetworkInterfaces"]
            assert nic["Groups"] == ["{{cluster_security_group_id}}", "{{head_security_group_id}}"]
            assert nic["SubnetId"] == "{{head_subnet_id}}"
        else:
            assert nc["IamInstanceProfile"]["Arn"] == "{{worker_instance_profile_arn}}"
            assert nc["SubnetIds"] == "{{worker_subnet_ids}}"
            assert nc["SecurityGroupIds"] == ["{{cluster_security_group_id}}"], "workers: no admin group"
            assert "NetworkInterfaces" not in nc, "workers get no public address"


def test_gcp_workers_have_no_external_ip():
    nodes = load("gcp.yaml")["available_node_types"]
    assert nodes["head"]["node_config"]["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    for tname, t in nodes.items():
        if tname != "head":
            assert all("accessConfigs" not in ni for ni in t["node_config"]["networkInterfaces"]), tname
            assert t["node_config"]["serviceAccounts"][0]["email"] == "{{gcp_worker_service_account}}"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_setup_installs_biflow_env_bucket_and_keeps_token_auth(name):
    cfg = load(name)
    setup = "\n".join(cfg["setup_commands"])
    assert "biflow-dist/biflow-*.whl" in setup and "pip install" in setup
    assert '"ray[default,train,data,tune]==2.60.0"' in setup
    assert "export BIFLOW_BUCKET=" in setup and "export RAY_AUTH_MODE=token" in setup
    scheme = "s3://" if name == "aws.yaml" else "gs://"
    assert f'"{scheme}{{{{' in setup  # the bucket comes from a placeholder
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["file_mounts"]["~/biflow-dist"] == "./dist"
    start = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in start and "source ~/.biflow-env" in start
    head = "\n".join(cfg["head_start_ray_commands"])
    for flag in ("--port=6379", "--ray-client-server-port=10001", "--min-worker-port=10002",
                 "--max-worker-port=19999", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head


def test_aws_placeholders_are_terraform_outputs():
    """Every {{name}} in aws.yaml is an output of infra/terraform/aws."""
    import hcl2

    from biflow.cluster import placeholders

    with open(ROOT / "infra/terraform/aws/outputs.tf") as f:
        outputs = {name.strip('"') for block in hcl2.load(f)["output"] for name in block}
    needed = placeholders(load("aws.yaml"))
    assert needed == {"cluster_name", "region", "availability_zones", "bucket_name", "ami_id", "head_subnet_id",
                      "worker_subnet_ids", "cluster_security_group_id", "head_security_group_id",
                      "head_instance_profile_arn", "worker_instance_profile_arn"}
    assert needed <= outputs, f"missing outputs: {needed - outputs}"


# ---- KubeRay ----------------------------------------------------------------


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> dict:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "never LoadBalancer/NodePort: port-forward instead"
    assert head["rayStartParams"]["num-cpus"] == "0"
    env = {e["name"]: e for e in _containers(head["template"])[0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "biflow-ray-auth"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    return groups


def test_raycluster_manifest():
    docs = list(yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()))
    (rc,) = docs
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    groups = _check_cluster_spec(rc["spec"])
    assert set(groups) == {"gpu-1x", "gpu-8x", "cpu-data"}
    gpus = {}
    for name, g in groups.items():
        pod = g["template"]["spec"]
        limits = _containers(g["template"])[0]["resources"]["limits"]
        gpus[name] = int(limits.get("nvidia.com/gpu", 0))
        if gpus[name]:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"] == {"biflow/role": "gpu"}
            assert _containers(g["template"])[0]["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert gpus == {"gpu-1x": 1, "gpu-8x": 8, "cpu-data": 0}
    assert groups["gpu-8x"]["maxReplicas"] == 4 and groups["gpu-1x"]["maxReplicas"] == 8


def test_rayjob_manifest_runs_a_training_job():
    (rj,) = list(yaml.safe_load_all((KUBERAY / "rayjob.yaml").read_text()))
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["biflow", "train", "forward", "--config"]
    assert entry[4] in JOB_FILES and entry[4] == "jobs/imagenet256-b2-forward.yaml"
    assert "ray.workers=16" in entry
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    groups = _check_cluster_spec(spec["rayClusterSpec"])
    g8 = groups["gpu-8x"]
    assert _containers(g8["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert g8["replicas"] * 8 == 16, "16 GPU workers = two 8-GPU pods at start"


def test_kuberay_dockerfile_pins_ray_and_ships_jobs():
    text = (KUBERAY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert "COPY jobs/ /app/jobs/" in text


def test_readme_documents_the_workflow():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("terraform", "biflow cluster render", "ray up", "biflow submit", "--address http://127.0.0.1:8265",
                   "ray down", "kubectl port-forward", "ray get-auth-token", "infra/terraform/aws destroy"):
        assert needle in text, needle
    assert "0.0.0.0/0" not in text, "the README never suggests opening anything to the world"


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
    assert nodes["gpu-8x-a100-spot"]["node_config"]["SubnetIds"] == ["subnet-0bbb2222", "subnet-0ccc3333"]
    assert nodes["gpu-1x-a10g-ondemand"]["node_config"]["IamInstanceProfile"]["Arn"].endswith("/biflow-test-ray-worker")
    assert nodes["head"]["node_config"]["NetworkInterfaces"][0]["Groups"] == ["sg-0cluster", "sg-0head"]
    assert all(t["node_config"]["ImageId"] == "ami-0123456789abcdef0" for t in nodes.values())
    assert 's3://biflow-123456789012-us-west-2/checkpoints' in cfg["setup_commands"][0]


def test_render_gcp_from_plain_values(tmp_path):
    from biflow.cluster import render

    values = {"cluster_name": "biflow", "gcp_region": "us-central1", "gcp_zone": "us-central1-a",
              "gcp_project_id": "my-project", "gcp_subnetwork": "projects/my-project/regions/us-central1/subnetworks/ray",
              "gcp_head_service_account": "ray-head@my-project.iam.gserviceaccount.com",
              "gcp_worker_service_account": "ray-worker@my-project.iam.gserviceaccount.com",
              "gcp_bucket": "my-biflow"}
    vals = tmp_path / "values.json"
    vals.write_text(json.dumps(values))  # plain {name: value} is accepted too
    cfg = yaml.safe_load(render(vals, tmp_path, provider="gcp").read_text())
    ray_validate(cfg)
    assert cfg["provider"]["project_id"] == "my-project"
    assert cfg["available_node_types"]["head"]["node_config"]["tags"]["items"] == ["biflow-ray", "biflow-ray-head"]


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
