# Two groups:
#  - cluster: on every Ray node. Ray's ports are reachable only from members
#    of this same group (never from a CIDR): anyone who reaches the GCS,
#    dashboard/jobs or client port can run code (CVE-2023-48022).
#  - head: on the head only. No inbound rule by default (the head is reached
#    through SSM Session Manager); SSH (and, if asked, 8265) from optional
#    VPN/peered admin CIDRs.

locals {
  # Ray ports opened to the cluster's own group, by name. The all-traffic
  # self rule below also covers Ray's ephemeral ports, NCCL and EFA.
  ray_ports = {
    ssh            = { from = 22, to = 22, what = "SSH from the head's autoscaler to workers" }
    gcs            = { from = 6379, to = 6379, what = "Ray GCS" }
    dashboard_jobs = { from = 8265, to = 8265, what = "Ray dashboard and Jobs API" }
    client         = { from = 10001, to = 10001, what = "Ray client server" }
    object_manager = { from = 8076, to = 8076, what = "Ray object manager" }
    worker_ports   = { from = 10002, to = 19999, what = "Ray worker processes" }
  }
}

resource "aws_security_group" "cluster" {
  #checkov:skip=CKV2_AWS_5:Attached to instances by the Ray cluster launcher (cluster/aws.yaml SecurityGroupIds) and to EKS nodes, outside this module.
  name        = "${var.name}-ray-cluster"
  description = "Ray nodes of ${var.name}: Ray ports only from this group"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name}-ray-cluster" }
}

resource "aws_vpc_security_group_ingress_rule" "ray_ports" {
  #checkov:skip=CKV_AWS_24:False positive: the source is this security group (referenced_security_group_id), not a CIDR; CKV_AWS_24 does not read that attribute.
  for_each                     = local.ray_ports
  security_group_id            = aws_security_group.cluster.id
  referenced_security_group_id = aws_security_group.cluster.id
  ip_protocol                  = "tcp"
  from_port                    = each.value.from
  to_port                      = each.value.to
  description                  = "${each.value.what}, cluster members only"
}

resource "aws_vpc_security_group_ingress_rule" "intra_cluster" {
  #checkov:skip=CKV_AWS_24:False positive: the source is this security group (referenced_security_group_id), not a CIDR.
  #checkov:skip=CKV_AWS_25:False positive: the source is this security group (referenced_security_group_id), not a CIDR.
  security_group_id            = aws_security_group.cluster.id
  referenced_security_group_id = aws_security_group.cluster.id
  ip_protocol                  = "-1"
  description                  = "NCCL, EFA and Ray ephemeral ports between cluster members only"
}

resource "aws_vpc_security_group_egress_rule" "all" {
  #checkov:skip=CKV_AWS_382:Nodes install packages (pip, apt) and reach AWS APIs through NAT; egress is not a path into Ray's ports.
  security_group_id = aws_security_group.cluster.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Outbound: package indexes and AWS APIs via NAT, S3 via the gateway endpoint"
}

resource "aws_security_group" "head" {
  #checkov:skip=CKV2_AWS_5:Attached to the head instance by the Ray cluster launcher (cluster/aws.yaml NetworkInterfaces Groups), outside Terraform.
  name        = "${var.name}-ray-head-admin"
  description = "Ray head of ${var.name}: SSH only from optional admin CIDRs (SSM otherwise)"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name}-ray-head-admin" }
}

resource "aws_vpc_security_group_ingress_rule" "head_ssh" {
  for_each          = toset(var.admin_cidr_blocks)
  security_group_id = aws_security_group.head.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  description       = "SSH (ray up, ray attach, ray dashboard tunnel) from admin CIDR"
}

resource "aws_vpc_security_group_ingress_rule" "head_dashboard" {
  for_each          = var.expose_dashboard_to_admin ? toset(var.admin_cidr_blocks) : toset([])
  security_group_id = aws_security_group.head.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 8265
  to_port           = 8265
  description       = "Ray dashboard/Jobs API from admin CIDR (token auth stays on)"
}

resource "aws_vpc_security_group_egress_rule" "head_all" {
  #checkov:skip=CKV_AWS_382:The head's autoscaler calls the EC2 API and installs packages; egress is not a path into Ray's ports.
  security_group_id = aws_security_group.head.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "Outbound: AWS APIs and package indexes"
}
