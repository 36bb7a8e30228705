variable "name" {
  description = "Fleet name, used in resource names."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the fleet."
  type        = string
}

variable "admin_cidr_blocks" {
  description = "CIDR blocks (VPN, peered network) allowed to SSH to the head's private address (and reach 8265 if expose_dashboard_to_admin). Empty: no inbound rule at all (SSM only). Never 0.0.0.0/0."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidr_blocks : can(cidrnetmask(c)) && !contains(["0.0.0.0/0", "::/0"], c) && tonumber(split("/", c)[1]) >= 8])
    error_message = "admin_cidr_blocks must be IPv4 CIDR blocks no wider than /8; 0.0.0.0/0 is refused."
  }
}

variable "expose_dashboard_to_admin" {
  description = "Open the Ray dashboard/jobs port 8265 to admin_cidr_blocks."
  type        = bool
  default     = false
}
