"""deploy/appuser.py: which user a launcher runs submitted bundles as (issue 19, threats 3 and 8).
As root (CI), `auto` means 'nobody' wherever that user can reach the centres' sockets and
FLWR_HOME, else the launcher's own user with the reason logged; an explicit user that cannot
work is refused, naming why. (A real federation under the default: tests/test_examples.py.)"""

from __future__ import annotations

import os
import pwd

import pytest

from deploy import appuser
from models.config import ConfigError


def _tree(root, mode: int):
    state = root / "run" / "centres" / "a" / "state"
    places = appuser.places([state], [state / "worker.sock"])
    (root / "run").chmod(mode)
    return places


def test_root_runs_bundles_as_nobody_where_it_can_reach_them(short_tmp):
    assert os.geteuid() == 0, "CI runs as root"
    places = _tree(short_tmp, 0o755)
    assert places == [short_tmp / "run/centres/a/state/flwr-home", short_tmp / "run/centres/a/state"]
    user, why = appuser.resolve("auto", places)
    assert user == "nobody" and f"uid {pwd.getpwnam('nobody').pw_uid}" in why


def test_a_closed_directory_on_the_way_falls_back_and_says_so(short_tmp):
    places = _tree(short_tmp, 0o700)
    user, why = appuser.resolve("auto", places)
    assert user is None and f"nobody cannot reach {places[0]}" in why
    with pytest.raises(ConfigError, match="--app-user nobody: nobody cannot reach"):
        appuser.resolve("nobody", places)


def test_a_socket_outside_the_state_directory_is_not_reachable(short_tmp):
    state = short_tmp / "state"
    places = appuser.places([state], [short_tmp / "not-made-yet" / "worker.sock"])  # the worker makes it 0700
    assert appuser.resolve("auto", places)[0] is None


def test_none_unknown_users_and_non_root(short_tmp, monkeypatch):
    places = _tree(short_tmp, 0o755)
    user, why = appuser.resolve("none", places)
    assert user is None and "--app-user none" in why
    with pytest.raises(ConfigError, match="no such user"):
        appuser.resolve("no-such-user-bp", places)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    user, why = appuser.resolve("auto", places)
    assert user is None and why.startswith("not root")
    with pytest.raises(ConfigError, match="needs the launcher to run as root"):
        appuser.resolve("nobody", places)
