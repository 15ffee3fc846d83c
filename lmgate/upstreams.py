"""Which providers' upstream hosts resolve now.

nginx resolves an `upstream` server's name once, when it loads its config, and refuses the whole
config when one name does not resolve: one provider's DNS hiccup at boot would keep every provider
down. So the supervisor (lmgate/supervisor.py) resolves each host first and renders a provider whose host
does not resolve with its upstream marked down (lmgate/nginx_conf.py): its calls get a 502 in its
own error shape, recorded as `upstream_unreachable`, until the name resolves and nginx is reloaded.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from lmgate.settings import Settings


def provider_hosts(settings: Settings) -> dict[str, str]:
    """Provider name -> the host name its upstream URL dials."""
    return {name: urlsplit(p.upstream).hostname or "" for name, p in settings.providers.items()}


def resolve(host: str) -> frozenset[str]:
    """The host's addresses now; empty when it does not resolve."""
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except (OSError, UnicodeError):
        return frozenset()


def unresolved_providers(settings: Settings, addresses: dict[str, frozenset[str]]) -> frozenset[str]:
    """The providers whose host has no address in `addresses` (host -> addresses)."""
    return frozenset(name for name, host in provider_hosts(settings).items()
                     if host and not addresses.get(host))
