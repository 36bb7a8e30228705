"""checkov custom check CKV_BIFLOW_1: no security-group rule may open Ray's
ports (6379 GCS, 8265 dashboard/Jobs API, 10001 client) or SSH (22) to the
whole internet (0.0.0.0/0 or ::/0).

Anyone who reaches Ray's dashboard, jobs or client port can run code on the
cluster (CVE-2023-48022), and checkov has no built-in rule for these ports.

Covers ``aws_security_group`` (inline ingress blocks), ``aws_security_group_rule``
(type = "ingress") and ``aws_vpc_security_group_ingress_rule``. A rule with
protocol "-1"/"all" opens every port and is treated as such.

Run: checkov -d infra/terraform --external-checks-dir infra/checks --framework terraform
"""

from __future__ import annotations

from typing import Any, Iterable

from checkov.common.models.enums import CheckCategories, CheckResult
from checkov.terraform.checks.resource.base_resource_check import BaseResourceCheck

PROTECTED_PORTS = {22: "SSH", 6379: "Ray GCS", 8265: "Ray dashboard/Jobs API", 10001: "Ray client"}
WORLD = {"0.0.0.0/0", "::/0", "0000:0000:0000:0000:0000:0000:0000:0000/0"}
ALL_PROTOCOLS = {"-1", "all", -1}


def _first(value: Any) -> Any:
    """checkov wraps attribute values in lists; unwrap one level."""
    if isinstance(value, list):
        return value[0] if len(value) == 1 else value
    return value


def _as_list(value: Any) -> list:
    value = _first(value)
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        out: list = []
        for v in value:
            out.extend(_as_list(v))
        return out
    return [value]


def _as_int(value: Any) -> int | None:
    value = _first(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _protected_ports_opened(rule: dict) -> list[int]:
    protocol = _first(rule.get("protocol", rule.get("ip_protocol")))
    if isinstance(protocol, str):
        protocol = protocol.strip().lower()
    if protocol in ALL_PROTOCOLS:
        return sorted(PROTECTED_PORTS)
    if protocol not in (None, "tcp", "6"):
        return []  # udp/icmp rules cannot reach Ray's TCP ports
    from_port, to_port = _as_int(rule.get("from_port")), _as_int(rule.get("to_port"))
    if from_port is None or to_port is None:
        # Unresolved ports (variables without defaults): assume the worst.
        return sorted(PROTECTED_PORTS)
    if from_port == 0 and to_port == 0:
        to_port = 65535
    return [p for p in sorted(PROTECTED_PORTS) if from_port <= p <= to_port]


def _world_sources(rule: dict) -> list[str]:
    cidrs: Iterable[Any] = (_as_list(rule.get("cidr_blocks")) + _as_list(rule.get("ipv6_cidr_blocks"))
                            + _as_list(rule.get("cidr_ipv4")) + _as_list(rule.get("cidr_ipv6")))
    return [c for c in cidrs if isinstance(c, str) and c.strip() in WORLD]


class RayPortsNotPublic(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure no security group rule opens Ray ports (6379, 8265, 10001) or SSH to 0.0.0.0/0 or ::/0",
            id="CKV_BIFLOW_1",
            categories=(CheckCategories.NETWORKING,),
            supported_resources=("aws_security_group", "aws_security_group_rule",
                                 "aws_vpc_security_group_ingress_rule"),
        )

    @staticmethod
    def violations(rule: dict) -> list[int]:
        """Protected ports this ingress rule opens to the world (empty = fine)."""
        if not _world_sources(rule):
            return []
        return _protected_ports_opened(rule)

    def scan_resource_conf(self, conf: dict[str, list[Any]]) -> CheckResult:
        if "ingress" in conf:  # aws_security_group with inline rules
            for i, block in enumerate(conf["ingress"]):
                for rule in _as_list(block) if isinstance(block, list) else [block]:
                    if isinstance(rule, dict) and self.violations(rule):
                        self.evaluated_keys = [f"ingress/[{i}]/cidr_blocks", f"ingress/[{i}]/ipv6_cidr_blocks",
                                               f"ingress/[{i}]/from_port", f"ingress/[{i}]/to_port"]
                        return CheckResult.FAILED
            return CheckResult.PASSED
        if "type" in conf and _first(conf["type"]) != "ingress":
            return CheckResult.PASSED  # egress rules do not expose Ray's ports
        if "egress" in conf and "from_port" not in conf and "ip_protocol" not in conf:
            return CheckResult.PASSED  # security group with only egress blocks
        self.evaluated_keys = ["cidr_blocks", "ipv6_cidr_blocks", "cidr_ipv4", "cidr_ipv6", "from_port", "to_port"]
        return CheckResult.FAILED if self.violations(conf) else CheckResult.PASSED


check = RayPortsNotPublic()
