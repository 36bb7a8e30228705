# 8-GPU nodes (p4d.24xlarge, p5.48xlarge) for multi-node NCCL: one cluster
# placement group, every node in one subnet (so one availability zone), and
# an EFA interface on every network card. The Ray launcher starts these types
# from the launch templates below (cluster/aws.yaml LaunchTemplate); Ray copies
# the subnet and security groups from the interfaces.

locals {
  # Network cards per instance type: p4d.24xlarge 4, p5.48xlarge 32 (EC2 docs,
  # "Elastic Fabric Adapter: supported instance types").
  efa_cards = {
    a100 = { instance_type = "p4d.24xlarge", cards = 4 }
    h100 = { instance_type = "p5.48xlarge", cards = 32 }
  }
}

resource "aws_placement_group" "gpu8" {
  name     = "${var.name}-gpu8"
  strategy = "cluster"
  tags     = { Name = "${var.name}-gpu8" }
}

resource "aws_launch_template" "gpu8" {
  for_each = local.efa_cards

  name          = "${var.name}-gpu8-${each.key}"
  description   = "Ray ${each.value.instance_type} workers of ${var.name}: ${each.value.cards} EFA interfaces, cluster placement group ${aws_placement_group.gpu8.name}"
  instance_type = each.value.instance_type

  placement {
    group_name = aws_placement_group.gpu8.name
  }

  # Card 0 carries the primary interface (device 0); every other card one
  # EFA interface at device index 1, as EC2 documents for p4d/p5. No public
  # addresses: multi-card instances cannot get one, and these are workers.
  dynamic "network_interfaces" {
    for_each = range(each.value.cards)
    content {
      network_card_index          = network_interfaces.value
      device_index                = network_interfaces.value == 0 ? 0 : 1
      interface_type              = "efa"
      subnet_id                   = var.subnet_id
      security_groups             = [var.security_group_id]
      associate_public_ip_address = false
      delete_on_termination       = true
    }
  }

  # IMDSv2 only; hop limit 1 is enough because Ray's containers use the
  # host network (docker --net=host).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_size           = 1000
      volume_type           = "gp3"
      throughput            = 500
      iops                  = 6000
      encrypted             = true
      delete_on_termination = true
    }
  }

  tags = { Name = "${var.name}-gpu8-${each.key}" }
}
