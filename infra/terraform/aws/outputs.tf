# These names are what `biflow cluster render` reads (cluster/aws.yaml uses
# them as {{placeholders}}). Keep them in sync with biflow/cluster.py.

output "cluster_name" {
  description = "Ray cluster_name (the autoscaler's IAM policy is scoped to instances with this ray-cluster-name tag)."
  value       = var.name
}

output "region" {
  description = "AWS region of the fleet."
  value       = var.region
}

output "availability_zones" {
  description = "Comma-separated availability zones of the subnets (Ray's provider.availability_zone)."
  value       = join(",", module.network.availability_zones)
}

output "bucket_name" {
  description = "S3 bucket for dataset shards, checkpoints and logs."
  value       = module.storage.bucket_name
}

output "bucket_uri" {
  description = "s3:// URI of the bucket (exported as BIFLOW_BUCKET on every node)."
  value       = "s3://${module.storage.bucket_name}"
}

output "kms_key_arn" {
  description = "KMS key that encrypts the bucket."
  value       = module.storage.kms_key_arn
}

output "vpc_id" {
  description = "VPC of the fleet."
  value       = module.network.vpc_id
}

output "head_subnet_id" {
  description = "Public subnet for the Ray head (SSH from admin_cidr_blocks only)."
  value       = module.network.public_subnet_ids[0]
}

output "worker_subnet_ids" {
  description = "Private subnets (no public IPs, egress through NAT, S3 through a gateway endpoint) for Ray workers."
  value       = module.network.private_subnet_ids
}

output "cluster_security_group_id" {
  description = "Security group on every Ray node: all Ray ports open only to members of this group."
  value       = module.security.cluster_security_group_id
}

output "head_security_group_id" {
  description = "Extra security group on the head: SSH (and optionally 8265) from admin_cidr_blocks only."
  value       = module.security.head_security_group_id
}

output "head_instance_profile_arn" {
  description = "Instance profile of the Ray head (bucket access + autoscaler EC2 permissions + PassRole for the worker role)."
  value       = module.iam.head_instance_profile_arn
}

output "worker_instance_profile_arn" {
  description = "Instance profile of Ray workers (bucket access only)."
  value       = module.iam.worker_instance_profile_arn
}

output "ami_id" {
  description = "AWS Deep Learning Base AMI (Ubuntu 22.04, NVIDIA driver) for all Ray nodes in this region."
  value       = nonsensitive(data.aws_ssm_parameter.dlami.value)
}

output "eks_cluster_name" {
  description = "Name of the optional EKS cluster for KubeRay (null when enable_eks is false)."
  value       = var.enable_eks ? module.eks[0].cluster_name : null
}

output "account_id" {
  description = "AWS account id (used in ARNs; not a secret)."
  value       = data.aws_caller_identity.current.account_id
}

output "partition" {
  description = "AWS partition (aws, aws-us-gov, aws-cn)."
  value       = data.aws_partition.current.partition
}
