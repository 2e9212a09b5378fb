"""Bearer API keys of the OpenAI routes: parsed from a file or an env var, checked in constant time.

Format, for the file and the env var alike: a YAML mapping of key name -> key, so one ``name: key``
per line and a JSON object both work::

    team-a: sk-amalia-3b1f...
    batch-eval: "sk-amalia-99c0..."

A name identifies the caller in logs and metrics (label ``api_key``); the key itself is never logged,
counted or echoed, not even in a parse error. Only SHA-256 digests of the keys stay in memory, and a
presented token is compared with every digest (``hmac.compare_digest`` over equal-length digests, no
early exit), so the time a check takes says neither which key matched nor how long the keys are.

The file is re-read when it changes, without a restart: on the request path, at most once per
``reload_interval_s``, a ``stat`` that follows symlinks compares inode, size and times. That also
catches a Kubernetes Secret volume update, which writes a new directory and swaps the ``..data``
symlink the file name points through. A file that no longer parses is reported and the keys loaded
before keep working. Pure Python: no Ray, no web framework.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from amalia_serve.config import AuthConfig

# A Prometheus label value and a log field that needs no quoting.
KEY_NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
# Long enough that guessing is hopeless; `openssl rand -hex 24` gives 48 characters.
MIN_KEY_LENGTH = 16
# The api_key label of requests without a valid key: let through (auth not required) or refused.
ANONYMOUS = "anonymous"
UNAUTHORIZED = "unauthorized"


class ApiKeyError(ValueError):
    """A key source that cannot be used; the message names the source and key names, never a key."""


class AuthenticationFailed(Exception):
    """The request carries no valid key; the message is safe to return to the caller."""


class MissingKey(AuthenticationFailed):
    pass


class InvalidKey(AuthenticationFailed):
    pass


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a name given twice (plain YAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        name = loader.construct_object(key_node)
        if not isinstance(name, Hashable):
            continue  # construct_mapping refuses it with YAML's own error
        if name in seen:
            raise ApiKeyError(
                f"key name {name!r} is given twice (line {key_node.start_mark.line + 1})"
            )
        seen.add(name)
    return dict(loader.construct_mapping(node))


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def parse_keys(text: str, source: str) -> dict[str, bytes]:
    """Key name -> SHA-256 digest of the key, from the text of a key file or env var.

    Raises ApiKeyError naming `source` on anything but a mapping of valid names to string keys of at
    least MIN_KEY_LENGTH characters, each key used once. An empty text is an empty mapping.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except ApiKeyError as exc:
        raise ApiKeyError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        # PyYAML's own message quotes the offending line, which may hold a key: position only.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ApiKeyError(f"{source}: not YAML{where}; expected one `name: key` per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ApiKeyError(f"{source}: expected a mapping of name: key, got a {type(data).__name__}")
    digests: dict[str, bytes] = {}
    owner: dict[bytes, str] = {}
    for name, key in data.items():
        if not isinstance(name, str) or not KEY_NAME_PATTERN.match(name):
            raise ApiKeyError(
                f"{source}: key name {name!r} must match {KEY_NAME_PATTERN.pattern} (lower case, "
                "digits, '.', '_', '-'; it becomes a metrics label)"
            )
        if name in (ANONYMOUS, UNAUTHORIZED):
            raise ApiKeyError(f"{source}: key name {name!r} is reserved for requests without a key")
        if not isinstance(key, str):
            raise ApiKeyError(f"{source}: the key of {name!r} is not a string; quote it")
        if len(key) < MIN_KEY_LENGTH or key != key.strip() or any(c.isspace() for c in key):
            raise ApiKeyError(
                f"{source}: the key of {name!r} must be at least {MIN_KEY_LENGTH} characters "
                "without whitespace"
            )
        digest = _digest(key)
        if digest in owner:
            raise ApiKeyError(f"{source}: {owner[digest]!r} and {name!r} have the same key")
        owner[digest] = name
        digests[name] = digest
    return digests


def _merge(sources: list[tuple[str, dict[str, bytes]]]) -> dict[str, bytes]:
    """One name -> digest map from several sources; names and keys stay unique across them."""
    merged: dict[str, bytes] = {}
    where: dict[str, str] = {}
    owner: dict[bytes, str] = {}
    for source, keys in sources:
        for name, digest in keys.items():
            if name in merged:
                raise ApiKeyError(f"key name {name!r} is in both {where[name]} and {source}")
            if digest in owner:
                raise ApiKeyError(
                    f"the key of {name!r} in {source} is also the key of {owner[digest]!r} "
                    f"in {where[owner[digest]]}"
                )
            merged[name], where[name], owner[digest] = digest, source, name
    return merged


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class _FileState:
    """What `stat` says about the key file; any difference means: read it again."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileState:
        st = os.stat(path)  # follows symlinks: a swapped `..data` link shows as a new inode
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ApiKeyStore:
    """The valid keys of one ingress replica, kept current with their file."""

    def __init__(
        self,
        keys_file: str | Path | None = None,
        env_keys: tuple[str, str] | None = None,
        required: bool = True,
        reload_interval_s: float = 5.0,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`env_keys` is (env var name, its value). Raises ApiKeyError when a source is unusable now:
        at start there are no earlier keys to fall back on, and refusing to start says so clearly."""
        self.file = Path(keys_file) if keys_file is not None else None
        self.required = required
        self.reload_interval_s = reload_interval_s
        self.last_error: str | None = None
        self._log = logger or logging.getLogger(__name__)
        self._clock = clock
        self._static: list[tuple[str, dict[str, bytes]]] = []
        if env_keys is not None:
            env_name, text = env_keys
            self._static.append((f"env {env_name}", parse_keys(text, f"env {env_name}")))
        self._file_state: _FileState | None = None
        self._next_check = 0.0
        self._keys: tuple[tuple[str, bytes], ...] = ()
        if self.file is None:
            self._keys = tuple(_merge(self._static).items())
        else:
            try:
                state = _FileState.of(self.file)
            except OSError as exc:
                raise ApiKeyError(f"API key file {self.file}: {exc.strerror}") from None
            self._load(state)
            self._next_check = clock() + reload_interval_s
        self._log.info("API keys: %d loaded (%s)", len(self._keys), ", ".join(self.names) or "none")

    @classmethod
    def from_config(
        cls,
        auth: AuthConfig,
        logger: logging.Logger | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> ApiKeyStore | None:
        """The store `auth` describes, or None when it names no key source (API keys off)."""
        if not auth.enabled:
            return None
        env_keys = None
        if auth.keys_env is not None:
            if auth.keys_env not in environ:
                raise ApiKeyError(f"env {auth.keys_env} (ingress.auth.keys_env) is not set")
            env_keys = (auth.keys_env, environ[auth.keys_env])
        return cls(auth.keys_file, env_keys, auth.required, auth.reload_interval_s, logger)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._keys]

    def _load(self, state: _FileState) -> None:
        assert self.file is not None
        try:
            text = self.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"API key file {self.file}: {exc}") from None
        source = f"API key file {self.file}"
        self._keys = tuple(_merge([*self._static, (source, parse_keys(text, source))]).items())
        self._file_state = state

    def reload_if_changed(self) -> None:
        """Re-read the key file if it changed; at most once per reload_interval_s.

        On a bad file (unparsable, missing, unreadable) the keys loaded before stay, the error is
        logged once and kept in `last_error`, and the same bad version is not read again.
        """
        if self.file is None or self._clock() < self._next_check:
            return
        self._next_check = self._clock() + self.reload_interval_s
        try:
            state = _FileState.of(self.file)
        except OSError as exc:
            self._fail(f"API key file {self.file}: {exc.strerror}")
            return
        if state == self._file_state:
            return
        before = set(self.names)
        try:
            self._load(state)
        except ApiKeyError as exc:
            self._file_state = state  # this version is bad; wait for the next one
            self._fail(str(exc))
            return
        self.last_error = None
        now = set(self.names)
        self._log.info(
            "API keys reloaded from %s: %d keys; added %s, removed %s",
            self.file, len(now), sorted(now - before) or "none", sorted(before - now) or "none",
        )  # fmt: skip

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            self._log.error("%s; keeping the %d keys loaded before", message, len(self._keys))
        self.last_error = message

    def identify(self, token: str) -> str | None:
        """The name of the key equal to `token`, or None; every key is compared, match or not."""
        presented = _digest(token)
        found = None
        for name, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    def authenticate(self, authorization: str | None) -> str:
        """The caller's key name for an Authorization header value.

        Without a valid key: ANONYMOUS when keys are not required, else MissingKey or InvalidKey.
        """
        self.reload_if_changed()
        token = parse_bearer(authorization)
        name = self.identify(token) if token is not None else None
        if name is not None:
            return name
        if not self.required:
            return ANONYMOUS
        if token is None:
            raise MissingKey(
                "You didn't provide an API key. Send it in an Authorization header: "
                "`Authorization: Bearer <key>`."
            )
        raise InvalidKey("Incorrect API key provided.")
