variable "name" {
  description = "Fleet name, used in resource names."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC."
  type        = string

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR block."
  }
}

variable "az_count" {
  description = "Number of availability zones."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 1 && var.az_count <= 4
    error_message = "az_count must be between 1 and 4."
  }
}

variable "single_nat_gateway" {
  description = "One shared NAT gateway instead of one per zone."
  type        = bool
  default     = true
}

variable "flow_log_bucket_arn" {
  description = "ARN of the S3 bucket that receives VPC flow logs (under vpc-flow-logs/)."
  type        = string
}
