output "vpc_id" {
  description = "Id of the fleet VPC."
  value       = aws_vpc.this.id
}

output "vpc_arn" {
  description = "VPC ARN (scopes the autoscaler's RunInstances to this VPC)."
  value       = aws_vpc.this.arn
}

output "availability_zones" {
  description = "Zones of the subnets."
  value       = local.azs
}

output "public_subnet_ids" {
  description = "Public subnets (NAT, Ray head)."
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "Private subnets (Ray workers, EKS nodes)."
  value       = aws_subnet.private[*].id
}

output "s3_endpoint_id" {
  description = "Gateway endpoint for S3."
  value       = aws_vpc_endpoint.s3.id
}
