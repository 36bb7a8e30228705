# biflow fleet on AWS: a VPC with private worker subnets, one S3 bucket for
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

module "iam" {
  source = "./modules/iam"

  name         = var.name
  cluster_name = var.name
  bucket_arn   = module.storage.bucket_arn
  kms_key_arn  = module.storage.kms_key_arn
  vpc_arn      = module.network.vpc_arn
}

module "eks" {
  source = "./modules/eks"
  count  = var.enable_eks ? 1 : 0

  name                   = var.name
  kubernetes_version     = var.eks_version
  subnet_ids             = module.network.private_subnet_ids
  cluster_security_group = module.security.cluster_security_group_id
  public_access_cidrs    = var.eks_public_access_cidrs
  gpu_instance_types     = var.eks_gpu_instance_types
  gpu_max_nodes          = var.eks_gpu_max_nodes
  gpu_capacity_type      = var.eks_gpu_capacity_type
  kms_key_arn            = module.storage.kms_key_arn
  data_access_policy_arn = module.iam.data_access_policy_arn
}
