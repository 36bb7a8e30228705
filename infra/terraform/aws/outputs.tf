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
  description = "s3:// URI of the bucket (the nodes get its shards/ and checkpoints/ as BIFLOW_DATA_URI and BIFLOW_STORAGE)."
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
  description = "Private subnet of the Ray head (no public address; reached through SSM Session Manager)."
  value       = module.network.private_subnet_ids[0]
}

output "worker_subnet_ids" {
  description = "Private subnets (no public IPs, egress through NAT, S3 through a gateway endpoint) for Ray workers."
  value       = module.network.private_subnet_ids
}

output "gpu8_subnet_id" {
  description = "The one private subnet (one zone) of every 8-GPU node."
  value       = module.network.private_subnet_ids[var.gpu8_az_index]
}

output "gpu8_placement_group" {
  description = "Cluster placement group of the 8-GPU nodes."
  value       = module.gpu8.placement_group_name
}

output "gpu8_a100_launch_template_id" {
  description = "Launch template of p4d.24xlarge Ray workers (4 EFA interfaces, placement group, one subnet)."
  value       = module.gpu8.launch_template_ids["a100"]
}

output "gpu8_h100_launch_template_id" {
  description = "Launch template of p5.48xlarge Ray workers (32 EFA interfaces, placement group, one subnet)."
  value       = module.gpu8.launch_template_ids["h100"]
}

output "image_repository_url" {
  description = "ECR repository of the biflow image (docker push here)."
  value       = module.registry.repository_url
}

output "image" {
  description = "The pinned biflow image (repository:tag) that the Ray launcher and KubeRay run."
  value       = "${module.registry.repository_url}:${var.image_tag}"
}

output "image_efa" {
  description = "The EFA variant of the image (cluster/image/Dockerfile.efa: + libfabric, aws-ofi-nccl) that the 8-GPU nodes run."
  value       = "${module.registry.repository_url}:${var.image_tag}-efa"
}

output "ecr_registry" {
  description = "Registry host of the image, for `docker login` on the nodes."
  value       = split("/", module.registry.repository_url)[0]
}

output "cluster_security_group_id" {
  description = "Security group on every Ray node: all Ray ports open only to members of this group."
  value       = module.security.cluster_security_group_id
}

output "head_security_group_id" {
  description = "Extra security group on the head: no inbound rule unless admin_cidr_blocks (VPN) is set."
  value       = module.security.head_security_group_id
}

output "head_instance_profile_arn" {
  description = "Instance profile of the Ray head (bucket access + autoscaler EC2 permissions + PassRole for the worker role + SSM)."
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

output "eks_cluster_endpoint" {
  description = "API endpoint of the EKS cluster (private unless eks_public_access_cidrs is set; null without EKS)."
  value       = var.enable_eks ? module.eks[0].cluster_endpoint : null
}

output "karpenter_node_role_name" {
  description = "Karpenter node role (EC2NodeClass spec.role in cluster/kuberay/karpenter.yaml; null without EKS)."
  value       = var.enable_eks ? module.eks[0].karpenter_node_role_name : null
}

output "karpenter_queue_name" {
  description = "Interruption queue (spot warnings, rebalance, state changes, scheduled changes) for the Karpenter chart: --set settings.interruptionQueue=<this> (null without EKS)."
  value       = var.enable_eks ? module.eks[0].karpenter_queue_name : null
}

output "gpu8_zone" {
  description = "Availability zone of every 8-GPU node (launcher subnet and the gpu-8x Karpenter NodePool)."
  value       = module.network.availability_zones[var.gpu8_az_index]
}

output "account_id" {
  description = "AWS account id (used in ARNs; not a secret)."
  value       = data.aws_caller_identity.current.account_id
}

output "partition" {
  description = "AWS partition (aws, aws-us-gov, aws-cn)."
  value       = data.aws_partition.current.partition
}
