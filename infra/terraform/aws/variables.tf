variable "region" {
  description = "AWS region for the fleet, e.g. us-west-2."
  type        = string
  default     = "us-west-2"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "The region must look like us-west-2."
  }
}

variable "name" {
  description = "Name of the fleet. Also the Ray cluster_name: the autoscaler may only start, stop and terminate instances tagged ray-cluster-name=<name>."
  type        = string
  default     = "biflow"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name))
    error_message = "The name must be 3-31 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "admin_cidr_blocks" {
  description = "CIDR blocks (your office or VPN egress, e.g. 203.0.113.10/32) allowed to SSH to the Ray head node, and to reach the dashboard if expose_dashboard_to_admin is true. Never the whole internet."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidr_blocks) > 0 && alltrue([for c in var.admin_cidr_blocks : can(cidrnetmask(c))])
    error_message = "admin_cidr_blocks must be a non-empty list of IPv4 CIDR blocks such as 203.0.113.10/32."
  }

  validation {
    condition     = alltrue([for c in var.admin_cidr_blocks : !contains(["0.0.0.0/0", "::/0"], c) && tonumber(split("/", c)[1]) >= 8])
    error_message = "admin_cidr_blocks must not open the head node to the internet: 0.0.0.0/0 and prefixes shorter than /8 are refused."
  }
}

variable "expose_dashboard_to_admin" {
  description = "Also open the Ray dashboard/jobs port 8265 on the head to admin_cidr_blocks. Default false: reach it through an SSH tunnel (ray dashboard cluster.yaml) instead."
  type        = bool
  default     = false
}

variable "vpc_cidr" {
  description = "CIDR block of the fleet's VPC. Public subnets take /24s at the start of it; private (worker) subnets take /20s."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 16
    error_message = "vpc_cidr must be an IPv4 CIDR block of size /16 or larger."
  }
}

variable "az_count" {
  description = "How many availability zones to spread subnets over (more zones = more spot capacity pools)."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 1 && var.az_count <= 4
    error_message = "az_count must be between 1 and 4."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all private subnets (cheaper, about 32 USD/month plus traffic) instead of one per zone (zone-failure tolerant)."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Name of the S3 bucket for dataset shards, checkpoints and logs. Null: <name>-<account id>-<region>."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, '.' and '-')."
  }
}

variable "checkpoint_prefix" {
  description = "Key prefix under which training runs write checkpoints; old (noncurrent) versions under it expire."
  type        = string
  default     = "checkpoints/"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+/$", var.checkpoint_prefix))
    error_message = "checkpoint_prefix must be a single path segment ending in '/', e.g. checkpoints/."
  }
}

variable "noncurrent_version_days" {
  description = "Days after which overwritten or deleted checkpoint and log object versions are removed."
  type        = number
  default     = 14

  validation {
    condition     = var.noncurrent_version_days >= 1 && var.noncurrent_version_days <= 3650
    error_message = "noncurrent_version_days must be between 1 and 3650."
  }
}

variable "force_destroy_bucket" {
  description = "Allow terraform destroy to delete a non-empty bucket (all shards and checkpoints). Keep false outside experiments."
  type        = bool
  default     = false
}

variable "enable_eks" {
  description = "Also create an EKS cluster with a CPU node group (Ray head, KubeRay operator) and a GPU node group for KubeRay workers."
  type        = bool
  default     = false
}

variable "eks_version" {
  description = "Kubernetes version of the optional EKS cluster."
  type        = string
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.eks_version))
    error_message = "eks_version must look like 1.31."
  }
}

variable "eks_public_access_cidrs" {
  description = "CIDR blocks allowed to reach the EKS API endpoint publicly. Empty (default): the endpoint is private to the VPC."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.eks_public_access_cidrs : can(cidrnetmask(c)) && !contains(["0.0.0.0/0", "::/0"], c)])
    error_message = "eks_public_access_cidrs must be IPv4 CIDR blocks and must not include 0.0.0.0/0."
  }
}

variable "eks_gpu_instance_types" {
  description = "Instance types of the EKS GPU node group (g5.xlarge: 1x A10G for tests; p4d.24xlarge or p5.48xlarge: 8 GPUs)."
  type        = list(string)
  default     = ["g5.xlarge"]

  validation {
    condition     = length(var.eks_gpu_instance_types) > 0 && alltrue([for t in var.eks_gpu_instance_types : can(regex("^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e|p5en)\\.[0-9a-z]+$", t))])
    error_message = "eks_gpu_instance_types must be NVIDIA GPU instance types (g4dn, g5, g6, g6e, p3, p4d, p4de, p5, p5e, p5en)."
  }
}

variable "eks_gpu_max_nodes" {
  description = "Upper bound of the EKS GPU node group (the cluster autoscaler or Karpenter scales between 0 and this)."
  type        = number
  default     = 4

  validation {
    condition     = var.eks_gpu_max_nodes >= 1 && var.eks_gpu_max_nodes <= 64
    error_message = "eks_gpu_max_nodes must be between 1 and 64."
  }
}

variable "eks_gpu_capacity_type" {
  description = "Capacity type of the EKS GPU node group: SPOT or ON_DEMAND."
  type        = string
  default     = "SPOT"

  validation {
    condition     = contains(["SPOT", "ON_DEMAND"], var.eks_gpu_capacity_type)
    error_message = "eks_gpu_capacity_type must be SPOT or ON_DEMAND."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
