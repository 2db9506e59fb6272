"""clients/appnet.py: which network a submitted bundle's app host gets (issue 19, threat 3).
As root with an app user (CI), `auto` and `none` mean an empty network namespace; wherever that cannot
work (not root, no app user, `unshare --net` refused as in a Docker container without CAP_SYS_ADMIN)
`auto` falls back to the runtime's network with one line saying why and `none` is refused naming it.
(The attack itself, through a real federation: tests/test_redteam_bundle.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clients import appnet
from models.config import ConfigError

# `unshare` run as nobody: the kernel refuses it a network namespace (EPERM), as Docker's default capabilities do.
DIAL = ("import errno, socket\ntry:\n    socket.create_connection(('127.0.0.1', 1), 5)\n"
        "except OSError as err:\n    print(errno.errorcode[err.errno])")
REFUSED = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "unshare"]


def test_root_with_an_app_user_gets_an_empty_namespace():
    assert os.geteuid() == 0, "CI runs as root"
    for choice in ("auto", "none"):
        prefix, why = appnet.resolve(choice, "nobody")
        assert prefix[-2:] == ["--net", "--"] and "no network" in why
        # What the app host would see: only lo, and down (so every TCP/UDP connect fails).
        done = subprocess.run([*prefix, "cat", "/proc/net/dev"], capture_output=True, text=True, check=True)
        assert [line.split(":")[0].strip() for line in done.stdout.splitlines()[2:]] == ["lo"]
        dial = subprocess.run([*prefix, sys.executable, "-c", DIAL], capture_output=True, text=True)
        assert dial.stdout.strip() == "ENETUNREACH", dial  # in the centre's namespace: ECONNREFUSED


def test_a_refused_unshare_falls_back_and_says_why():
    prefix, why = appnet.resolve("auto", "nobody", REFUSED)
    assert prefix == [] and "share this centre's network" in why and "Operation not permitted" in why
    assert "CAP_SYS_ADMIN" in why
    with pytest.raises(ConfigError, match="--app-network none: `unshare --net` failed .*--app-network host"):
        appnet.resolve("none", "nobody", REFUSED)


def test_host_no_app_user_non_root_and_unknown_choices(monkeypatch):
    assert appnet.resolve("host", "nobody") == ([], appnet.resolve("host", None)[1])
    prefix, why = appnet.resolve("auto", None)  # a root bundle could setns back: no namespace is made
    assert prefix == [] and "no --app-user" in why
    with pytest.raises(ConfigError, match="no --app-user"):
        appnet.resolve("none", None)
    with pytest.raises(ConfigError, match="must be one of auto, none, host"):
        appnet.resolve("off", "nobody")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    prefix, why = appnet.resolve("auto", "nobody")
    assert prefix == [] and "not root" in why
    with pytest.raises(ConfigError, match="not root"):
        appnet.resolve("none", "nobody")


def test_the_supernode_refuses_none_without_its_runtime():
    """Stock flwr-clientapp (--no-warm) runs bundles in the SuperNode's own network: `none` cannot hold there."""
    from clients import supernode

    with pytest.raises(SystemExit, match="--app-network none needs the warm runtime"):
        supernode.main(["--no-warm", "--app-network", "none"])
