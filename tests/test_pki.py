"""Red team, issue 19 threat 9: the coordinator must never hold a centre's private key.

Each centre makes its own SuperNode key pair (deploy/centre-key.sh) and hands over only the
public half; the coordinator (deploy/pki.sh) makes a CA limited to signing one level of
certificates, a SuperLink certificate naming only what it is given, and registers public keys.
Attempts to hand the coordinator a private key, or to make it generate centre keys, are refused."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from deploy import commands

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SANS = "DNS:link.example.org,IP:10.1.2.3"


def _sh(script: str, *args: str, sans: str | None = SANS) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUPERLINK_SANS"}
    if sans is not None:
        env["SUPERLINK_SANS"] = sans
    return subprocess.run(["sh", str(DEPLOY / script), *args], env=env, capture_output=True, text=True, timeout=120)


def _ext(cert: Path, ext: str) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", ext], capture_output=True,
                          text=True, check=True).stdout


def _private_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}


@pytest.fixture()
def handed_over(tmp_path):
    """Two centres make their keys at home; the coordinator gets only the .pub files."""
    keys = {}
    for c in ("fr-genci", "de-lrz"):
        done = _sh("centre-key.sh", str(tmp_path / "centres" / c), c, str(tmp_path / "inbox"))
        assert done.returncode == 0, done.stderr
        assert "hand over only" in done.stdout
        keys[c] = tmp_path / "inbox" / f"{c}.pub"
    return tmp_path, keys


def test_centres_make_their_own_keys_and_the_coordinator_sees_only_public_halves(handed_over):
    tmp_path, keys = handed_over
    out = tmp_path / "coordinator"
    done = _sh("pki.sh", str(out), *(f"{c}={k}" for c, k in keys.items()))
    assert done.returncode == 0, done.stderr
    assert _private_files(out) == {"ca/ca.key", "server/server.key"}  # its own two keys, no centre's
    for c, pub in keys.items():
        secret = (tmp_path / "centres" / c / "supernode.key").read_bytes()
        assert all(p.read_bytes() != secret for p in out.rglob("*") if p.is_file())
        assert (out / "public" / f"{c}.pub").read_bytes() == pub.read_bytes()
        assert stat.S_IMODE((tmp_path / "centres" / c / "supernode.key").stat().st_mode) == 0o600


def test_the_ca_is_limited_and_the_server_certificate_names_only_what_it_is_given(handed_over):
    tmp_path, keys = handed_over
    out = tmp_path / "coordinator"
    assert _sh("pki.sh", str(out), *(f"{c}={k}" for c, k in keys.items())).returncode == 0
    ca = out / "ca" / "ca.crt"
    usage = _ext(ca, "keyUsage")
    assert "critical" in usage and "Certificate Sign, CRL Sign" in usage
    assert "Digital Signature" not in usage
    constraints = _ext(ca, "basicConstraints")
    assert "critical" in constraints and "CA:TRUE, pathlen:0" in constraints
    server = out / "server" / "server.crt"
    sans = _ext(server, "subjectAltName").splitlines()[-1].replace(" ", "")
    assert sans == "DNS:link.example.org,IPAddress:10.1.2.3"
    assert "CA:FALSE" in _ext(server, "basicConstraints")
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(server)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    before = ca.read_bytes()
    assert _sh("pki.sh", str(out)).returncode == 0  # again (every `compose up`): the CA is kept
    assert ca.read_bytes() == before


@pytest.mark.parametrize("attack", ["private-key", "old-usage", "no-sans", "bad-name", "missing", "not-a-key"])
def test_the_coordinator_refuses_to_make_or_take_a_centre_private_key(handed_over, attack):
    tmp_path, keys = handed_over
    out = tmp_path / "coordinator"
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\n")
    args, sans, expect = {
        "private-key": ([f"fr-genci={tmp_path / 'centres' / 'fr-genci' / 'supernode.key'}"], SANS, "PRIVATE key"),
        "old-usage": (["fr-genci", "de-lrz"], SANS, "centres make their own keys"),  # pki.sh OUT CENTRE... as before
        "no-sans": ([f"fr-genci={keys['fr-genci']}"], None, "SUPERLINK_SANS"),
        "bad-name": ([f"../x={keys['fr-genci']}"], SANS, "must be letters"),
        "missing": ([f"fr-genci={tmp_path / 'nope.pub'}"], SANS, "not found"),
        "not-a-key": ([f"fr-genci={junk}"], SANS, "not an ECDSA OpenSSH public key"),
    }[attack]
    done = _sh("pki.sh", str(out), *args, sans=sans)
    assert done.returncode != 0 and expect in done.stderr, done.stderr
    assert not out.exists() or _private_files(out) == set()  # refused before anything was made


def test_the_launchers_layout_from_pki_steps(tmp_path):
    """local, netns and the intruder test run every part on one machine: each centre's key in its
    own directory, the coordinator's script given only the public halves."""
    pki = commands.Pki(tmp_path / "pki")
    steps = commands.pki_steps(str(DEPLOY), pki, ["fr-genci", "de-lrz"], ["DNS:localhost", "IP:127.0.0.1"])
    *keys, coordinator = steps
    assert all(argv[1].endswith("centre-key.sh") for argv, _ in keys)
    assert coordinator[0][1].endswith("pki.sh") and all(a.endswith(".key.pub") for a in coordinator[0][3:])
    for argv, env in steps:
        subprocess.run(argv, env={**os.environ, **env}, check=True, capture_output=True, timeout=120)
    for path in (pki.server_cert, pki.server_key, pki.server_ca_cert, pki.ca_cert, pki.centre_ca_cert("fr-genci"),
                 pki.private_key("fr-genci"), pki.public_key("de-lrz")):
        assert Path(path).is_file(), path
    assert _private_files(Path(pki.root) / "public") == set()
