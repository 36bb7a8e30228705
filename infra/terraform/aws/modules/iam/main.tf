# Head: bucket access + what Ray's AWS autoscaler calls (run/describe/tag/
# stop/terminate instances of this cluster) + PassRole for the worker role +
# SSM Session Manager (how `ray up`/`ray dashboard` reach the private head).
# Workers: bucket access only. Both: pull the biflow image from its ECR repo.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  p      = data.aws_partition.current.partition
  region = data.aws_region.current.name
  acct   = data.aws_caller_identity.current.account_id
  ec2    = "arn:${local.p}:ec2:${local.region}:${local.acct}"
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "head" {
  name               = "${var.name}-ray-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name}-ray-head"
  role = aws_iam_role.head.name
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name}-ray-worker"
  role = aws_iam_role.worker.name
}

# ---- data bucket: this bucket and its key, nothing else --------------------

data "aws_iam_policy_document" "data" {
  statement {
    sid       = "ListThisBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [var.bucket_arn]
  }

  statement {
    sid = "ReadWriteObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${var.bucket_arn}/*"]
  }

  statement {
    sid       = "UseTheBucketKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_policy" "data" {
  name        = "${var.name}-data-bucket"
  description = "Read/write the ${var.name} data bucket only"
  policy      = data.aws_iam_policy_document.data.json
}

resource "aws_iam_role_policy_attachment" "head_data" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.data.arn
}

resource "aws_iam_role_policy_attachment" "worker_data" {
  role       = aws_iam_role.worker.name
  policy_arn = aws_iam_policy.data.arn
}

# ---- autoscaler (head only) ------------------------------------------------

data "aws_iam_policy_document" "autoscaler" {
  #checkov:skip=CKV_AWS_356:Only ec2:Describe* calls use "*": EC2 Describe actions do not support resource-level permissions.
  statement {
    sid = "DescribeOnly"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
      "ec2:DescribeAvailabilityZones",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:DescribeSpotInstanceRequests",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "RunOnlyTaggedInstancesOfThisCluster"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "RunOnlyInThisVpc"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2}:subnet/*", "${local.ec2}:security-group/*", "${local.ec2}:network-interface/*"]
    condition {
      test     = "ArnEquals"
      variable = "ec2:Vpc"
      values   = [var.vpc_arn]
    }
  }

  statement {
    sid     = "RunWithTheseSupportingResources"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2}:volume/*",
      "${local.ec2}:key-pair/*",
      "${local.ec2}:launch-template/*",
      "${local.ec2}:spot-instances-request/*",
      "arn:${local.p}:ec2:${local.region}::image/*",
    ]
  }

  statement {
    sid       = "RunInTheGpu8PlacementGroup"
    actions   = ["ec2:RunInstances"]
    resources = [var.placement_group_arn]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2}:instance/*", "${local.ec2}:volume/*", "${local.ec2}:spot-instances-request/*", "${local.ec2}:network-interface/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOnlyThisClustersInstances"
    actions   = ["ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["${local.ec2}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  statement {
    sid       = "PassOnlyTheWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadTheWorkerInstanceProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker.arn]
  }
}

resource "aws_iam_policy" "autoscaler" {
  name        = "${var.name}-ray-autoscaler"
  description = "Ray autoscaler on the ${var.name} head: launch and stop this cluster's workers only"
  policy      = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_role_policy_attachment" "head_autoscaler" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.autoscaler.arn
}

# ---- SSM Session Manager on the head --------------------------------------
# `ray up` reaches the head (in a private subnet, no public address, no
# inbound rule) through `aws ssm start-session` (auth.ssh_proxy_command in
# cluster/aws.yaml). The agent needs only outbound HTTPS (NAT).

resource "aws_iam_role_policy_attachment" "head_ssm" {
  role       = aws_iam_role.head.name
  policy_arn = "arn:${local.p}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# ---- image pulls (head and workers) ---------------------------------------

data "aws_iam_policy_document" "image_pull" {
  #checkov:skip=CKV_AWS_356:ecr:GetAuthorizationToken has no resource-level permissions; pulls are limited to one repository below.
  statement {
    sid       = "LogInToEcr"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid       = "PullTheBiflowImageOnly"
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [var.ecr_repository_arn]
  }
}

resource "aws_iam_policy" "image_pull" {
  name        = "${var.name}-image-pull"
  description = "Pull the ${var.name} image from its ECR repository only"
  policy      = data.aws_iam_policy_document.image_pull.json
}

resource "aws_iam_role_policy_attachment" "image_pull" {
  for_each   = { head = aws_iam_role.head.name, worker = aws_iam_role.worker.name }
  role       = each.value
  policy_arn = aws_iam_policy.image_pull.arn
}

# ---- spot service-linked role ----------------------------------------------
# EC2 launches spot instances (the launcher's -spot types, Karpenter's spot
# offerings) as AWSServiceRoleForEC2Spot. An account that never ran spot lacks
# it, and every spot launch fails until it exists. There is one per account and
# creating it twice fails: set create_spot_service_linked_role = false where it
# already exists (`aws iam get-role --role-name AWSServiceRoleForEC2Spot`).

resource "aws_iam_service_linked_role" "spot" {
  count            = var.create_spot_service_linked_role ? 1 : 0
  aws_service_name = "spot.amazonaws.com"
  description      = "EC2 Spot launches for the ${var.name} fleet (Ray launcher and Karpenter)"
}
