output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = aws_eks_cluster.this.name
}

output "node_role_arn" {
  description = "Role of the EKS nodes."
  value       = aws_iam_role.node.arn
}
