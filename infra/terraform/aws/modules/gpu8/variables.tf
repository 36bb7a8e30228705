variable "name" {
  description = "Fleet name, used in resource names."
  type        = string
}

variable "subnet_id" {
  description = "The one private subnet (so one availability zone) that every 8-GPU node uses."
  type        = string
}

variable "security_group_id" {
  description = "Ray cluster security group (all traffic between members, as EFA requires)."
  type        = string
}
