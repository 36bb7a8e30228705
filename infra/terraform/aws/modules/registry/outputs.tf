output "repository_url" {
  description = "ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME: push the image here."
  value       = aws_ecr_repository.biflow.repository_url
}

output "repository_arn" {
  description = "ARN of the repository (nodes may pull from it only)."
  value       = aws_ecr_repository.biflow.arn
}
