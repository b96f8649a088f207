"""Gateway: runs multi-stage jobs across the model services, persists them and streams progress."""

from dramaturg.shared.registry import ServiceEntry

SERVICE = ServiceEntry(
    name="gateway",
    factory="dramaturg.services.gateway.server:create_service",
    settings="dramaturg.services.gateway.config:GatewaySettings",
    extra="gateway",
    description="multi-stage jobs across the model services",
)
