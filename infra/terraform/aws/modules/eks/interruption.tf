# Karpenter's interruption queue (Helm value settings.interruptionQueue):
# EventBridge sends spot interruption warnings, rebalance recommendations,
# instance state changes and AWS Health scheduled changes here, and Karpenter
# cordons and drains the node before EC2 takes it away (the Ray pods' preStop
# hook drains Ray first, cluster/kuberay/raycluster.yaml). The karpenter module
# can make the same queue inside itself (enable_spot_termination); it is made
# here instead so that its encryption, its policy and its rules are in this
# repository, checked by checkov and tests/test_infra.py.

locals {
  interruption_queue_name = "${local.cluster_name}-karpenter-interruption"

  # The events Karpenter handles, with the patterns of Karpenter's own
  # getting-started CloudFormation template.
  interruption_events = {
    scheduled-change = {
      description = "AWS Health scheduled changes (instance retirement, maintenance)"
      source      = "aws.health"
      detail_type = "AWS Health Event"
    }
    spot-interruption = {
      description = "EC2 spot instance interruption warnings (two minutes' notice)"
      source      = "aws.ec2"
      detail_type = "EC2 Spot Instance Interruption Warning"
    }
    rebalance = {
      description = "EC2 instance rebalance recommendations (elevated spot interruption risk)"
      source      = "aws.ec2"
      detail_type = "EC2 Instance Rebalance Recommendation"
    }
    instance-state-change = {
      description = "EC2 instance state changes (stopping, terminated)"
      source      = "aws.ec2"
      detail_type = "EC2 Instance State-change Notification"
    }
  }
}

# Encrypted at rest with SQS-managed keys: EventBridge can write to it without
# a KMS key policy grant, and the messages hold instance ids, nothing secret.
resource "aws_sqs_queue" "interruption" {
  name                      = local.interruption_queue_name
  message_retention_seconds = 300
  sqs_managed_sse_enabled   = true
  tags                      = var.tags
}

resource "aws_cloudwatch_event_rule" "interruption" {
  for_each = local.interruption_events

  name        = "${local.cluster_name}-karpenter-${each.key}"
  description = "Karpenter interruption: ${each.value.description}"
  event_pattern = jsonencode({
    source      = [each.value.source]
    detail-type = [each.value.detail_type]
  })
  tags = var.tags
}

resource "aws_cloudwatch_event_target" "interruption" {
  for_each = local.interruption_events

  rule      = aws_cloudwatch_event_rule.interruption[each.key].name
  target_id = "KarpenterInterruptionQueue"
  arn       = aws_sqs_queue.interruption.arn
}

# Only these rules may send; nothing may use the queue without TLS. Karpenter's
# controller reads it through its own role (iam_policy_statements in main.tf).
data "aws_iam_policy_document" "interruption_queue" {
  statement {
    sid       = "TheseEventBridgeRulesSend"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.interruption.arn]
    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [for rule in aws_cloudwatch_event_rule.interruption : rule.arn]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [aws_sqs_queue.interruption.arn]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "interruption" {
  queue_url = aws_sqs_queue.interruption.url
  policy    = data.aws_iam_policy_document.interruption_queue.json
}
