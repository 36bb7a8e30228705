variable "name" {
  description = "Repository name (the fleet name)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the repository."
  type        = string
}
