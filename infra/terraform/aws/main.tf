# biflow fleet on AWS: a VPC whose Ray nodes (head included) sit in private
# subnets (the head is reached through SSM Session Manager), one S3 bucket for
# shards/checkpoints/logs, IAM for the Ray head (autoscaler) and workers,
# security groups that keep Ray's ports inside the cluster, and an optional
# EKS cluster for KubeRay. `terraform output -json > tf.json` then
# `biflow cluster render --terraform-output tf.json --out rendered/` fills
# cluster/aws.yaml.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# AWS Deep Learning Base AMI (Ubuntu 22.04, NVIDIA driver + CUDA), looked up
# from AWS's public SSM parameter so every region gets its current image.
data "aws_ssm_parameter" "dlami" {
  name = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}

locals {
  bucket_name = coalesce(var.bucket_name, "${var.name}-${data.aws_caller_identity.current.account_id}-${var.region}")
}

module "storage" {
  source = "./modules/storage"

  name                    = var.name
  bucket_name             = local.bucket_name
  checkpoint_prefix       = var.checkpoint_prefix
  noncurrent_version_days = var.noncurrent_version_days
  force_destroy           = var.force_destroy_bucket
}

module "network" {
  source = "./modules/network"

  name                = var.name
  vpc_cidr            = var.vpc_cidr
  az_count            = var.az_count
  single_nat_gateway  = var.single_nat_gateway
  flow_log_bucket_arn = module.storage.bucket_arn
}

module "security" {
  source = "./modules/security"

  name                      = var.name
  vpc_id                    = module.network.vpc_id
  admin_cidr_blocks         = var.admin_cidr_blocks
  expose_dashboard_to_admin = var.expose_dashboard_to_admin
}

module "registry" {
  source = "./modules/registry"

  name        = var.name
  kms_key_arn = module.storage.kms_key_arn
}

# 8-GPU nodes: one zone, one cluster placement group, EFA on every card.
module "gpu8" {
  source = "./modules/gpu8"

  name              = var.name
  subnet_id         = module.network.private_subnet_ids[var.gpu8_az_index]
  security_group_id = module.security.cluster_security_group_id
}

module "iam" {
  source = "./modules/iam"

  name                = var.name
  cluster_name        = var.name
  bucket_arn          = module.storage.bucket_arn
  kms_key_arn         = module.storage.kms_key_arn
  vpc_arn             = module.network.vpc_arn
  placement_group_arn = module.gpu8.placement_group_arn
  ecr_repository_arn  = module.registry.repository_arn

  create_spot_service_linked_role = var.create_spot_service_linked_role
}

module "eks" {
  source = "./modules/eks"
  count  = var.enable_eks ? 1 : 0

  name                   = var.name
  kubernetes_version     = var.eks_version
  vpc_id                 = module.network.vpc_id
  subnet_ids             = module.network.private_subnet_ids
  cluster_security_group = module.security.cluster_security_group_id
  admin_cidr_blocks      = var.admin_cidr_blocks
  public_access_cidrs    = var.eks_public_access_cidrs
  system_instance_types  = var.eks_system_instance_types
  kms_key_arn            = module.storage.kms_key_arn
  data_access_policy_arn = module.iam.data_access_policy_arn
  tags                   = var.tags
}
