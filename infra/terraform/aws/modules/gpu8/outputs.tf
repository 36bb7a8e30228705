output "placement_group_name" {
  description = "Cluster placement group of the 8-GPU nodes."
  value       = aws_placement_group.gpu8.name
}

output "placement_group_arn" {
  description = "ARN of the cluster placement group (scopes the autoscaler's RunInstances)."
  value       = aws_placement_group.gpu8.arn
}

output "launch_template_ids" {
  description = "Launch template id per 8-GPU class (a100: p4d.24xlarge, h100: p5.48xlarge)."
  value       = { for k, lt in aws_launch_template.gpu8 : k => lt.id }
}
