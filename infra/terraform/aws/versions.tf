# State: local by default. For a team, copy backend.tf.example to backend.tf
# (an S3 backend with native locking) before `terraform init`.
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.95"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Project = "biflow", Cluster = var.name }, var.tags)
  }
}
