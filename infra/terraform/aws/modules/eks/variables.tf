variable "name" {
  description = "Fleet name; the EKS cluster is <name>-eks."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes version (<major>.<minor>) of the cluster."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the cluster."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and the nodes."
  type        = list(string)
}

variable "cluster_security_group" {
  description = "Ray cluster security group: may reach the private API endpoint (SSM port forwarding through the Ray head)."
  type        = string
}

variable "admin_cidr_blocks" {
  description = "VPN/peered CIDRs that may reach the private API endpoint on 443."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidr_blocks : can(cidrnetmask(c)) && !contains(["0.0.0.0/0", "::/0"], c) && tonumber(split("/", c)[1]) >= 8])
    error_message = "admin_cidr_blocks must be IPv4 CIDR blocks no wider than /8; 0.0.0.0/0 is refused."
  }
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

variable "system_instance_types" {
  description = "Instance types of the on-demand system node group (KubeRay operator, Karpenter, Ray head)."
  type        = list(string)
  default     = ["m6i.2xlarge"]
}

variable "kms_key_arn" {
  description = "KMS key for Kubernetes secrets encryption."
  type        = string
}

variable "data_access_policy_arn" {
  description = "Managed policy for the data bucket, given to the Ray pods' Pod Identity role only."
  type        = string
}

variable "ray_namespace" {
  description = "Namespace of the Ray pods' service account."
  type        = string
  default     = "default"
}

variable "ray_service_account" {
  description = "Service account of the Ray pods (cluster/kuberay/serviceaccount.yaml)."
  type        = string
  default     = "biflow-ray"
}

variable "tags" {
  description = "Extra tags for the modules' resources."
  type        = map(string)
  default     = {}
}
