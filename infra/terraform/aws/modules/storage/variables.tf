variable "name" {
  description = "Fleet name, used in resource names."
  type        = string
}

variable "bucket_name" {
  description = "Name of the S3 bucket for shards, checkpoints and logs."
  type        = string
}

variable "checkpoint_prefix" {
  description = "Key prefix of checkpoints; noncurrent versions under it expire."
  type        = string
  default     = "checkpoints/"
}

variable "noncurrent_version_days" {
  description = "Days after which noncurrent checkpoint and log versions expire."
  type        = number
  default     = 14

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "noncurrent_version_days must be at least 1."
  }
}

variable "force_destroy" {
  description = "Allow deleting a non-empty bucket."
  type        = bool
  default     = false
}
