"""Register centres' SuperNode public keys at the SuperLink (`flwr supernode register`).

With `--enable-supernode-auth` the SuperLink admits only SuperNodes whose key an
operator registered; everything else is refused at activation. Registering a key
that is already registered (a restarted compose stack, a resumed run) is not an
error here, so this can run on every start.

    bridgepool deploy register --connection bridgepool pki/public/fr-genci.pub pki/public/de-lrz.pub
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy import commands
from deploy.processes import LaunchError, venv_bin

ALREADY = "Public key already in use"  # Flower's message (ApiErrorCode 23) for a registered key


def register_keys(public_keys: Sequence[str], *, connection: str = commands.CONNECTION,
                  env: dict[str, str] | None = None,
                  wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
                  timeout: float = 600.0) -> list[str]:
    """Register each key; returns one line per key ("registered" / "already registered").

    `timeout` per key: generous, because a SuperLink container that has just become healthy on a
    loaded machine took over 60 s to answer the first registration, and at load ~19 the flwr CLI
    itself took over 180 s (compose, 2-core machine)."""
    report = []
    for key in public_keys:
        if not Path(key).is_file():
            raise FileNotFoundError(f"SuperNode public key {key} not found; the centre makes it with "
                                    "deploy/centre-key.sh; the coordinator registers it (deploy/pki.sh CENTRE=PUBKEY)")
        argv = wrap(commands.register_supernode(key, connection=connection, exe=venv_bin("flwr")))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=env if env is not None else dict(os.environ), stdin=subprocess.DEVNULL)
        out = done.stdout + done.stderr
        if done.returncode == 0:
            report.append(f"{key}: registered")
        elif ALREADY.lower() in out.lower():
            # Flower answers the same for a key that was unregistered (revoked): such a key can
            # never join again, and nothing here can tell the two apart without its node id.
            report.append(f"{key}: already registered (if it was revoked with `flwr supernode unregister`, "
                          "it can never join again: the centre makes a new key with deploy/centre-key.sh)")
        else:
            raise LaunchError(f"registering SuperNode key {key} at connection '{connection}' failed "
                              f"(exit {done.returncode}):\n{out.strip()[-2000:]}")
    return report


# What a SuperNode's log says when the SuperLink will not admit it (Flower 1.41 exit code 305 and
# the API error inside it), and what it means for an operator.
_NO_CONNECTION = "Failed to initialize the connection to the SuperLink"
RUNTIME_LOGGER = "bridgepool.runtime"  # clients/runtime.py's logger name
_REFUSALS = (
    (("Failed to activate SuperNode",), "refused at activation: its public key is not registered at the "
     "SuperLink, or a SuperNode with this key is already online (the SuperLink log says which); register "
     "it with `bridgepool deploy register KEY.pub`, or stop the other SuperNode holding the key"),
    (("All SuperNodes must be registered",), "refused: SuperNode authentication is on and this SuperNode "
     "has no key; pass --auth-supernode-private-key"),
    # Nothing listens there: said first, so that a plaintext SuperNode is not told TLS is the cause.
    ((_NO_CONNECTION, "Connection refused"), "could not reach the SuperLink: nothing listens at the "
     "address given (not started yet, or a wrong --superlink host or port)"),
    # A TLS SuperLink drops a plaintext request; what the SuperNode then reports depends on timing
    # ("Server disconnected without sending a response", "Connection reset by peer", or nothing).
    (("Option `--insecure` was set", _NO_CONNECTION),
     "refused: it connected without TLS (--insecure) to a SuperLink that requires TLS"),
    (("CERTIFICATE_VERIFY_FAILED",), "refused: the SuperLink's certificate does not verify against "
     "--root-certificates (another CA, or a SAN missing for the address dialled)"),
    (("SuperNode authentication requires a secure TLS connection",),
     "not started: a key was given together with --insecure; authentication needs TLS"),
)


def supernode_refusal(log: str) -> str | None:
    """Why the SuperLink refused this SuperNode, from its log; None when the log shows no refusal."""
    # Our ClientApp runtime's lines say nothing about the SuperLink: it polls the SuperNode's own
    # port, and once the refused SuperNode has exited it logs "Connection refused" for that port.
    log = "\n".join(line for line in log.splitlines() if RUNTIME_LOGGER not in line)
    for needles, why in _REFUSALS:
        if all(n in log for n in needles):
            return why
    return None
