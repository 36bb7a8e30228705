output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "API server endpoint (private unless public_access_cidrs is set)."
  value       = module.eks.cluster_endpoint
}

output "karpenter_node_role_name" {
  description = "Node role of Karpenter's nodes (EC2NodeClass spec.role)."
  value       = module.karpenter.node_iam_role_name
}

output "karpenter_queue_name" {
  description = "SQS queue of interruption events (Karpenter's Helm value settings.interruptionQueue)."
  value       = aws_sqs_queue.interruption.name
}

output "ray_pods_role_arn" {
  description = "Role the Ray pods get through Pod Identity (bucket access only)."
  value       = aws_iam_role.ray_pods.arn
}
