variable "name" {
  description = "Fleet name, used in role names."
  type        = string
}

variable "cluster_name" {
  description = "Ray cluster_name: the autoscaler may only manage instances tagged ray-cluster-name=<cluster_name>."
  type        = string
}

variable "bucket_arn" {
  description = "ARN of the data bucket; the only bucket the nodes can touch."
  type        = string
}

variable "kms_key_arn" {
  description = "ARN of the bucket's KMS key."
  type        = string
}

variable "vpc_arn" {
  description = "ARN of the fleet's VPC; the autoscaler may launch only into it."
  type        = string
}

variable "placement_group_arn" {
  description = "ARN of the 8-GPU cluster placement group the autoscaler may launch into."
  type        = string
}

variable "ecr_repository_arn" {
  description = "ARN of the ECR repository of the biflow image; the only one nodes can pull from."
  type        = string
}

variable "create_spot_service_linked_role" {
  description = "Create AWSServiceRoleForEC2Spot (one per account; false where it already exists)."
  type        = bool
  default     = true
}
