output "cluster_security_group_id" {
  description = "Group on every Ray node; Ray ports open only to members."
  value       = aws_security_group.cluster.id
}

output "head_security_group_id" {
  description = "Extra group on the head: SSH (and optionally 8265) from admin CIDRs."
  value       = aws_security_group.head.id
}
