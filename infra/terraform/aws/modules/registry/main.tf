# One ECR repository for the pinned biflow image (cluster/image/Dockerfile):
# the Ray launcher (docker:) and KubeRay both run it. Tags are immutable, so a
# tag that names the versions always means the same image.

resource "aws_ecr_repository" "biflow" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"
  force_delete         = false

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.kms_key_arn
  }
}

resource "aws_ecr_lifecycle_policy" "biflow" {
  repository = aws_ecr_repository.biflow.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Drop untagged layers after 14 days"
      selection    = { tagStatus = "untagged", countType = "sinceImagePushed", countUnit = "days", countNumber = 14 }
      action       = { type = "expire" }
    }]
  })
}
