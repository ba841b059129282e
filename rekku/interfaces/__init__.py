"""Interfaces: where Rekku's messages go (telegram_bot, discord_bot, webhook, outbox).

Each interface is one module of this package that registers its class with
:func:`register_interface`; :func:`get_interfaces` builds the ones whose configuration is
complete. Sending (splitting, never twice, forwarding to linked chats) is :func:`deliver`.
"""

from rekku.interfaces.base import DeliveryUncertain, Interface, Outgoing, split_text
from rekku.interfaces.registry import InterfaceRegistry, get_interfaces, register_interface

__all__ = ["Interface", "Outgoing", "DeliveryUncertain", "split_text", "InterfaceRegistry", "get_interfaces",
           "register_interface"]
