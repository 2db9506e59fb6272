"""Which centre a node is: the name its registered SuperNode key is filed under, not the name its reply claims
(issue 19, threat 5).

With SuperNode authentication on, the SuperLink admits only keys an operator registered, and it checks
every Fleet request's signature against the key of the node id the request names: a node id stands for
one registered key. The ServerApp reads that record through Flower's public Grid API (`grid.get_nodes()`:
the Runtime API's GetNodes, NodeInfo.public_key, the PEM Flower stored at registration) and looks the key
up in the operator's registry: the directory deploy/pki.sh fills with each centre's public half, CENTRE.pub
(OpenSSH, made at the centre by deploy/centre-key.sh). So a centre's name comes from the coordinator's own
files and the SuperLink's authentication; a reply can only repeat it. A reply claiming another name is
refused before validation (server/liveness.py `claim`); a node whose key is in no CENTRE.pub is sent
nothing, and anything it sends is refused (server/app.py `_listed`).

This needs no signature of our own: the SuperLink already verified the node's key on every request. What
it does not cover: a centre that hands its private key to someone else, and a SuperLink run without
`--enable-supernode-auth` (then keys are whatever a SuperNode made up, and no name is pinned: the launchers
set `centre-keys` only where node authentication is on; deploy/local.py, deploy/compose.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from models.config import ConfigError, check_run_name

SUFFIX = ".pub"


class NodeKey(Protocol):  # flwr.proto.node_pb2.NodeInfo, the two fields read here
    node_id: int
    public_key: bytes


def _der(key: object) -> bytes:
    """One form for a key whichever file format it came in (OpenSSH at the centre, PEM at the SuperLink)."""
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class Registry:
    """Centre name <-> public key, from the operator's CENTRE.pub files."""

    def __init__(self, by_key: dict[bytes, str], source: str = "") -> None:
        self.by_key = by_key  # DER SubjectPublicKeyInfo -> centre name
        self.source = source  # where the CENTRE.pub files were read, for messages

    @classmethod
    def load(cls, directory: str | Path) -> Registry:
        """Every CENTRE.pub in `directory` (other files, such as ca.crt, are not keys and are left alone)."""
        root = Path(directory)
        if not root.is_dir():
            raise ConfigError(f"config key 'centre-keys': {root} is not a directory; give the directory of "
                              "CENTRE.pub files (deploy/pki.sh OUT/public), or \"\" to take names from replies")
        by_key: dict[bytes, str] = {}
        for path in sorted(root.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            try:
                check_run_name(name)  # the same alphabet as deploy/centre-key.sh allows
                key = _der(serialization.load_ssh_public_key(path.read_bytes()))
            except (ConfigError, ValueError, TypeError) as err:
                raise ConfigError(f"config key 'centre-keys': {path} is not a centre's OpenSSH public key named "
                                  f"CENTRE.pub ({err}); the centre makes it with deploy/centre-key.sh") from err
            if key in by_key:
                raise ConfigError(f"config key 'centre-keys': {path} holds the same key as {by_key[key]}.pub; "
                                  "one key names one centre")
            by_key[key] = name
        if not by_key:
            raise ConfigError(f"config key 'centre-keys': no CENTRE.pub in {root}")
        return cls(by_key, str(root))

    def name_of(self, public_key: bytes) -> str | None:
        """The centre whose key the SuperLink holds as `public_key` (Flower's PEM), None if none is."""
        try:
            return self.by_key.get(_der(serialization.load_pem_public_key(public_key)))
        except (ValueError, TypeError):  # empty (no node authentication) or not a key
            return None

    def pins(self, nodes: Iterable[NodeKey]) -> dict[int, str | None]:
        """Node id -> its centre's name, None for a node whose key names no centre."""
        return {int(n.node_id): self.name_of(bytes(n.public_key)) for n in nodes}

    def names(self) -> list[str]:
        return sorted(self.by_key.values())
