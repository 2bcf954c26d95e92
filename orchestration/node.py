"""Which machine a worker runs on, as Ray names it: the node id groups ranks by node, the label goes into errors."""
from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    hostname: str

    @property
    def label(self) -> str:
        """`IP (host NAME, Ray node 1a2b3c4d)`: on one machine several Ray nodes share IP and hostname."""
        return f"{self.ip} (host {self.hostname}, Ray node {self.node_id[:8]})"


def this_node() -> NodeInfo:
    """This process's node; outside Ray (a plain process) the hostname stands for the node."""
    import ray

    hostname = socket.gethostname()
    if not ray.is_initialized():
        return NodeInfo(node_id=hostname, ip=socket.gethostbyname(hostname), hostname=hostname)
    return NodeInfo(node_id=ray.get_runtime_context().get_node_id(), ip=ray.util.get_node_ip_address(),
                    hostname=hostname)
