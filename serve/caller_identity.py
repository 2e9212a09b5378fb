"""Which workload called the API, from the header a service mesh's local proxy sets: pure, no Ray.

Istio's sidecar terminates the caller's mTLS and appends one element to ``x-forwarded-client-cert``
(XFCC) before the request reaches the app (Envoy's ``APPEND_FORWARD``), e.g.::

    By=spiffe://cluster.local/ns/ai/sa/ray;Hash=..;Subject="";URI=spiffe://cluster.local/ns/a/sa/app

Elements are separated by commas, key=value pairs by semicolons, and a value holding ``,;=`` is
double-quoted with ``\\"`` escapes. Whatever the caller sent comes first; the element the local
proxy vouches for is the last one, and its URI SAN is the caller's SPIFFE id. Under STRICT mTLS on
the API port every request passes the proxy, so the last element is always the proxy's own. An
Istio ambient waypoint annotated ``ambient.istio.io/xfcc-include-client-identity: "true"``
(Istio >= 1.30) replaces the whole header with one element of the same shape.

Linkerd's inbound proxy sets ``l5d-client-id`` to the client's mTLS identity, replacing any value
the client sent and removing it for plaintext clients, e.g.
``chat.team-a.serviceaccount.identity.linkerd.cluster.local`` (ServiceAccount, namespace, then the
control plane's namespace and the trust domain).

With no mesh both headers are whatever the caller wrote, so nothing here reads them
(``MeshConfig.identifies_callers``). A malformed or ambiguous header means no identity: never an
error, and never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from amalia_serve.config import K8S_LABEL_PATTERN, K8S_SUBDOMAIN_PATTERN, MeshConfig

XFCC_HEADER = "x-forwarded-client-cert"
LINKERD_ID_HEADER = "l5d-client-id"
IDENTITY_HEADERS = {
    "istio": XFCC_HEADER,
    "istio-ambient": XFCC_HEADER,
    "linkerd": LINKERD_ID_HEADER,
}

# The metric and log label of a request the mesh gave no usable identity; never a `ns/sa` label.
UNIDENTIFIED = "unidentified"

# The caller of the request being served, as its label: the ingress sets it per request, and log
# records and metrics read it (asyncio gives each request task its own copy). Reach it through the
# two functions below: Serve pickles the ingress's methods, and a ContextVar cannot be pickled.
current_caller: ContextVar[str | None] = ContextVar("amalia_caller", default=None)


def set_current_caller(label: str) -> None:
    current_caller.set(label)


def current_caller_label() -> str | None:
    return current_caller.get()

_NAMESPACE = re.compile(K8S_LABEL_PATTERN)
_SERVICE_ACCOUNT = re.compile(K8S_SUBDOMAIN_PATTERN)
_SPIFFE_K8S = re.compile(r"^spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")
_LINKERD_MARK = ".serviceaccount.identity."


@dataclass(frozen=True)
class CallerIdentity:
    """A Kubernetes workload identity: ServiceAccount `service_account` in `namespace`."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def label(self) -> str:
        """``team-a/chat``: the metric label and log field, one series per calling workload."""
        return f"{self.namespace}/{self.service_account}"

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


class HeaderLists(Protocol):
    """Every value of a request header (Starlette's ``Headers`` is one)."""

    def getlist(self, key: str) -> list[str]: ...


def _identity(trust_domain: str, namespace: str, service_account: str) -> CallerIdentity | None:
    if not (
        trust_domain and _NAMESPACE.match(namespace) and _SERVICE_ACCOUNT.match(service_account)
    ):
        return None
    return CallerIdentity(trust_domain, namespace, service_account)


def _xfcc_chars(value: str) -> Iterator[tuple[str, bool]]:
    """Each character with whether it is a separator: an unquoted ``,``, ``;`` or ``=``.

    Quotes are dropped and ``\\x`` inside quotes yields a literal ``x``.
    """
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
            yield char, False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        else:
            yield char, not quoted and char in ",;="
    if quoted or escaped:
        raise ValueError("XFCC value ends inside a quoted string")


def split_xfcc(value: str) -> list[list[tuple[str, str]]]:
    """The elements of an XFCC value, each a list of (lower-case key, unquoted value) pairs.

    Raises ValueError on an unterminated quote or a pair without ``=``.
    """
    elements: list[list[tuple[str, str]]] = [[]]
    key: str | None = None
    text: list[str] = []
    for char, separator in [*_xfcc_chars(value), (",", True)]:
        if not separator or (char == "=" and key is not None):
            text.append(char)
        elif char == "=":
            key, text = "".join(text).strip().lower(), []
        else:
            if key is not None:
                elements[-1].append((key, "".join(text).strip()))
            elif "".join(text).strip():
                raise ValueError(f"XFCC pair without '=': {''.join(text).strip()!r}")
            key, text = None, []
            if char == ",":
                elements.append([])
    return [element for element in elements if element]


def parse_spiffe_id(uri: str) -> CallerIdentity | None:
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, Istio's Kubernetes form."""
    match = _SPIFFE_K8S.match(uri)
    return _identity(match["td"], match["ns"], match["sa"]) if match else None


def identity_from_xfcc(values: list[str]) -> CallerIdentity | None:
    """The caller the local proxy vouches for: the URI SAN of the last XFCC element.

    ``values`` are every XFCC header line in order (proxies may also fold them into one).
    """
    try:
        elements = split_xfcc(",".join(values))
    except ValueError:
        return None
    if not elements:
        return None
    uris = [value for key, value in elements[-1] if key == "uri"]
    identities = {identity for identity in map(parse_spiffe_id, uris) if identity is not None}
    # An Istio workload certificate carries exactly one SPIFFE URI SAN; two are not a caller.
    return identities.pop() if len(identities) == 1 else None


def identity_from_linkerd(values: list[str]) -> CallerIdentity | None:
    """``<sa>.<ns>.serviceaccount.identity.<control-plane namespace>.<trust domain>``."""
    if len(values) != 1:
        return None
    workload, mark, rest = values[0].strip().partition(_LINKERD_MARK)
    control_plane, _, trust_domain = rest.partition(".")
    # Namespaces hold no dots; a ServiceAccount name may.
    service_account, _, namespace = workload.rpartition(".")
    if not (mark and control_plane and service_account):
        return None
    return _identity(trust_domain, namespace, service_account)


class CallerGate:
    """Identifies the caller of a request and decides whether it may use the API."""

    def __init__(self, mesh: MeshConfig) -> None:
        self._mesh = mesh
        self._header = IDENTITY_HEADERS.get(mesh.provider) if mesh.identifies_callers else None
        self._parse = identity_from_linkerd if mesh.provider == "linkerd" else identity_from_xfcc

    @property
    def enabled(self) -> bool:
        """Whether requests are identified at all (a mesh provider whose header is trusted)."""
        return self._header is not None

    def identify(self, headers: HeaderLists) -> CallerIdentity | None:
        """The caller, or None: no mesh, no header, a malformed one, or a foreign trust domain."""
        if self._header is None:
            return None
        identity = self._parse(headers.getlist(self._header))
        if identity is None or identity.trust_domain != self._mesh.trust_domain:
            return None
        return identity

    def allows(self, caller: CallerIdentity | None) -> bool:
        rules = self._mesh.allowed_callers
        if not rules:
            return True
        return caller is not None and any(
            rule.namespace == caller.namespace
            and rule.service_account in (None, caller.service_account)
            for rule in rules
        )

    def sticky_key(self, caller: CallerIdentity | None) -> str | None:
        """The routing key of a request that carries none of its own."""
        return caller.spiffe_id if caller is not None and self._mesh.sticky_by_caller else None
