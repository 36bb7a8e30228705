output "head_instance_profile_arn" {
  description = "Instance profile for the Ray head."
  value       = aws_iam_instance_profile.head.arn
}

output "worker_instance_profile_arn" {
  description = "Instance profile for Ray workers."
  value       = aws_iam_instance_profile.worker.arn
}

output "head_role_arn" {
  description = "Role of the Ray head."
  value       = aws_iam_role.head.arn
}

output "worker_role_arn" {
  description = "Role of the Ray workers."
  value       = aws_iam_role.worker.arn
}

output "data_access_policy_arn" {
  description = "Managed policy granting access to the data bucket only (attach to other roles, e.g. EKS nodes)."
  value       = aws_iam_policy.data.arn
}
