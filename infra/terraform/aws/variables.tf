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
  description = "Optional CIDR blocks of a VPN or peered network (e.g. 10.8.0.0/16) allowed to SSH to the Ray head's private address, and to reach the dashboard if expose_dashboard_to_admin is true. Default empty: the head has no inbound rule and is reached through SSM Session Manager. Never the whole internet."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidr_blocks : can(cidrnetmask(c))])
    error_message = "admin_cidr_blocks must be a list of IPv4 CIDR blocks such as 10.8.0.0/16."
  }

  validation {
    condition     = alltrue([for c in var.admin_cidr_blocks : !contains(["0.0.0.0/0", "::/0"], c) && tonumber(split("/", c)[1]) >= 8])
    error_message = "admin_cidr_blocks must not open the head node to the internet: 0.0.0.0/0 and prefixes shorter than /8 are refused."
  }
}

variable "expose_dashboard_to_admin" {
  description = "Also open the Ray dashboard/jobs port 8265 on the head to admin_cidr_blocks. Default false: reach it through the SSM-proxied SSH tunnel of `ray dashboard` instead."
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

variable "create_spot_service_linked_role" {
  description = "Create the account's spot service-linked role (AWSServiceRoleForEC2Spot), without which every spot launch fails in an account that never ran spot. There is one per account and creating it twice fails: set false when `aws iam get-role --role-name AWSServiceRoleForEC2Spot` finds it (another stack, an earlier spot launch, the console)."
  type        = bool
  default     = true
}

variable "enable_eks" {
  description = "Also create an EKS cluster with a CPU node group (Ray head, KubeRay operator) and a GPU node group for KubeRay workers."
  type        = bool
  default     = false
}

variable "eks_version" {
  description = "Kubernetes version of the optional EKS cluster. Keep it in EKS standard support (about 14 months per minor version); 1.34 and older are refused."
  type        = string
  default     = "1.35"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.eks_version)) && tonumber(split(".", var.eks_version)[1]) >= 35
    error_message = "eks_version must look like 1.35 and be 1.35 or newer (older minors are past EKS standard support)."
  }
}

variable "eks_public_access_cidrs" {
  description = "CIDR blocks (your IP/32) allowed to reach the EKS API endpoint publicly. Empty (default): the endpoint is private to the VPC (reach it over a VPN in admin_cidr_blocks or SSM port forwarding through the Ray head, cluster/README.md)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.eks_public_access_cidrs : can(cidrnetmask(c)) && !contains(["0.0.0.0/0", "::/0"], c)])
    error_message = "eks_public_access_cidrs must be IPv4 CIDR blocks and must not include 0.0.0.0/0."
  }
}

variable "eks_system_instance_types" {
  description = "Instance types of the EKS system node group (KubeRay operator, Karpenter, Ray head: the head pod asks for 3 CPU / 12Gi). GPU and data nodes come from Karpenter NodePools."
  type        = list(string)
  default     = ["m6i.2xlarge"]

  validation {
    condition     = length(var.eks_system_instance_types) > 0 && alltrue([for t in var.eks_system_instance_types : can(regex("^[a-z][a-z0-9-]*\\.[0-9a-z]+$", t))])
    error_message = "eks_system_instance_types must be EC2 instance types such as m6i.2xlarge."
  }
}

variable "gpu8_az_index" {
  description = "Which of the az_count zones (0-based) holds every 8-GPU node: one subnet, one cluster placement group, so NCCL over EFA stays inside one zone."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu8_az_index >= 0 && var.gpu8_az_index < 4
    error_message = "gpu8_az_index must be between 0 and 3 (and below az_count)."
  }
}

variable "image_tag" {
  description = "Tag of the biflow image in the fleet's ECR repository. It names the versions inside (cluster/image/README.md); tags are immutable."
  type        = string
  default     = "0.1.0-ray2.60.0-torch2.13.0-cu130-py311"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+-ray[0-9.]+-torch[0-9.]+-cu[0-9]+-py3[0-9]+$", var.image_tag))
    error_message = "image_tag must name the versions, like 0.1.0-ray2.60.0-torch2.13.0-cu130-py311."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
