# Optional EKS cluster for KubeRay, built from the terraform-aws-modules that
# EKS users already know (pinned; `terraform init` downloads them):
#  - eks: private API endpoint by default, secrets encrypted with the fleet's
#    KMS key, control-plane logs, a small on-demand "system" node group for
#    the KubeRay operator, Karpenter and the Ray head, and the Pod Identity
#    agent add-on.
#  - eks//modules/karpenter: the controller's IAM role (Pod Identity) and the
#    node role; the interruption queue and its EventBridge rules are in
#    interruption.tf. GPU and data nodes come from
#    Karpenter NodePools (cluster/kuberay/karpenter.yaml), scale from zero,
#    spot first with on-demand fallback.
# Bucket access: a role that only the Ray pods' service account can assume
# (EKS Pod Identity); no node role can touch the bucket.

locals {
  cluster_name = "${var.name}-eks"
}

module "eks" {
  #checkov:skip=CKV_TF_1:A Terraform Registry module pinned to an exact version (registry versions are immutable); a commit hash would need a git source.
  source  = "terraform-aws-modules/eks/aws"
  version = "20.37.1"

  cluster_name    = local.cluster_name
  cluster_version = var.kubernetes_version

  vpc_id     = var.vpc_id
  subnet_ids = var.subnet_ids

  cluster_endpoint_private_access      = true
  cluster_endpoint_public_access       = length(var.public_access_cidrs) > 0
  cluster_endpoint_public_access_cidrs = var.public_access_cidrs
  authentication_mode                  = "API"

  enable_cluster_creator_admin_permissions = true

  create_kms_key = false
  cluster_encryption_config = {
    provider_key_arn = var.kms_key_arn
    resources        = ["secrets"]
  }
  cluster_enabled_log_types              = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
  cloudwatch_log_group_retention_in_days = 365

  # The private API endpoint from inside the VPC: the Ray nodes' group (SSM
  # port forwarding through the Ray head) and optional VPN CIDRs.
  cluster_security_group_additional_rules = merge(
    {
      ingress_ray_cluster_https = {
        description              = "Kubernetes API from the Ray cluster group (SSM port forwarding via the head)"
        type                     = "ingress"
        protocol                 = "tcp"
        from_port                = 443
        to_port                  = 443
        source_security_group_id = var.cluster_security_group
      }
    },
    length(var.admin_cidr_blocks) > 0 ? {
      ingress_admin_https = {
        description = "Kubernetes API from admin (VPN) CIDRs"
        type        = "ingress"
        protocol    = "tcp"
        from_port   = 443
        to_port     = 443
        cidr_blocks = var.admin_cidr_blocks
      }
    } : {}
  )

  # EFA needs all traffic between the nodes of the group, both ways.
  node_security_group_additional_rules = {
    ingress_self_all = {
      description = "Node to node, all traffic (Ray, NCCL, EFA)"
      type        = "ingress"
      protocol    = "-1"
      from_port   = 0
      to_port     = 0
      self        = true
    }
    egress_self_all = {
      description = "Node to node, all traffic (EFA)"
      type        = "egress"
      protocol    = "-1"
      from_port   = 0
      to_port     = 0
      self        = true
    }
  }
  node_security_group_tags = { "karpenter.sh/discovery" = local.cluster_name }

  cluster_addons = {
    coredns                = {}
    kube-proxy             = {}
    vpc-cni                = { before_compute = true }
    eks-pod-identity-agent = { before_compute = true }
  }

  eks_managed_node_groups = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_instance_types
      capacity_type  = "ON_DEMAND"
      min_size       = 2
      max_size       = 3
      desired_size   = 2
      labels         = { "biflow/role" = "system" }

      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }

      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = 100
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
    }
  }

  tags = var.tags
}

module "karpenter" {
  #checkov:skip=CKV_TF_1:A Terraform Registry module pinned to an exact version (registry versions are immutable); a commit hash would need a git source.
  source  = "terraform-aws-modules/eks/aws//modules/karpenter"
  version = "20.37.1"

  cluster_name          = module.eks.cluster_name
  enable_v1_permissions = true

  enable_pod_identity             = true
  create_pod_identity_association = true
  namespace                       = "kube-system"
  service_account                 = "karpenter"

  node_iam_role_use_name_prefix = false
  node_iam_role_name            = "${var.name}-karpenter-node"

  # The interruption queue is interruption.tf's; the controller may read and
  # delete its messages, nothing more.
  enable_spot_termination = false
  iam_policy_statements = [{
    sid       = "ReadTheInterruptionQueue"
    actions   = ["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"]
    resources = [aws_sqs_queue.interruption.arn]
  }]

  tags = var.tags
}

# ---- bucket access for the Ray pods only (EKS Pod Identity) ---------------

data "aws_iam_policy_document" "pod_identity_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_pods" {
  name               = "${var.name}-eks-ray-pods"
  assume_role_policy = data.aws_iam_policy_document.pod_identity_assume.json
}

resource "aws_iam_role_policy_attachment" "ray_pods_data" {
  role       = aws_iam_role.ray_pods.name
  policy_arn = var.data_access_policy_arn
}

resource "aws_eks_pod_identity_association" "ray_pods" {
  cluster_name    = module.eks.cluster_name
  namespace       = var.ray_namespace
  service_account = var.ray_service_account
  role_arn        = aws_iam_role.ray_pods.arn
}
