variable "name" {
  description = "Fleet name; the EKS cluster is <name>-eks."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes version."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and the node groups."
  type        = list(string)
}

variable "cluster_security_group" {
  description = "Ray cluster security group, added to nodes so KubeRay pods and launcher nodes share the intra-cluster rules."
  type        = string
}

variable "public_access_cidrs" {
  description = "CIDRs allowed to the public API endpoint; empty keeps the endpoint private."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.public_access_cidrs, "0.0.0.0/0")
    error_message = "public_access_cidrs must not include 0.0.0.0/0."
  }
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group."
  type        = list(string)
}

variable "gpu_max_nodes" {
  description = "Maximum size of the GPU node group (minimum is 0)."
  type        = number
}

variable "gpu_capacity_type" {
  description = "SPOT or ON_DEMAND."
  type        = string
  default     = "SPOT"
}

variable "kms_key_arn" {
  description = "KMS key for Kubernetes secrets encryption."
  type        = string
}

variable "data_access_policy_arn" {
  description = "Managed policy for the data bucket, attached to the node role."
  type        = string
}
