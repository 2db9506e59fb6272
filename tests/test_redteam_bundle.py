"""Issue 19, threats 3, 7 and 8, performed by a submitted bundle against its own centre.

A bundle (tests/prying_clientapp.py) runs in a real federation whose centre runs
submitted code as its own user (`--app-user nobody`, root needed, as in CI). From inside
the ClientApp it tries to read the centre's corpus, read and append to the egress ledger,
list the run's state and write into the state directory; then it dials the coordinator's data plane and a
port this test listens on (TCP by address and by name, UDP), which the app host's empty network namespace
must refuse (`--app-network`, default none as root, clients/appnet.py) with nothing reaching the listener.
Every attempt must fail; the run must still finish,
the bundle relaying through the worker socket (0660 for its group) and its replies
checked by the runtime in another process. A second run with another bundle must get
a fresh app host, the first one's process gone (threat 7).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from deploy.local import LocalFederation
from models.config import APP_DIR, RunConfig, load_defaults
from tests.conftest import free_base_port, make_centres

APP_USER = "nobody"
NO_NETWORK = "OSError:ENETUNREACH"  # what every socket of the app host's namespace gives: its only interface is down


def _listen(probe: Path) -> tuple[socket.socket, socket.socket]:
    """A TCP listener and a UDP socket on one 127.0.0.1 port of the centre's own namespace, named to the bundle."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", tcp.getsockname()[1]))
    tcp.setblocking(False)
    udp.setblocking(False)
    (probe / "listen.json").write_text(json.dumps({"port": tcp.getsockname()[1]}))
    return tcp, udp


def _reached(tcp: socket.socket, udp: socket.socket) -> list[str]:
    """What reached the listener (nothing, if the bundle had no network); closes both."""
    got = []
    for sock, take in ((tcp, lambda s: f"tcp from {s.accept()[1]}"), (udp, lambda s: f"udp {s.recvfrom(64)}")):
        try:
            while True:
                got.append(take(sock))
        except BlockingIOError:
            pass
        finally:
            sock.close()
    return got


def _bundle(app_dir: Path, module: str) -> Path:
    """bridgepool's pyproject with tests/<module>.py as the ClientApp (a bundle of its own)."""
    app_dir.mkdir()
    shutil.copy(Path(__file__).with_name(f"{module}.py"), app_dir / f"{module}.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    text, n = re.subn(r'clientapp = "clients\.app:app"', f'clientapp = "{module}:app"', text)
    text, m = re.subn(r"(?m)^fab-include = \[.*\]$", f'fab-include = ["{module}.py"]', text)
    assert n == 1 and m == 1, "pyproject.toml layout changed; update _bundle"
    (app_dir / "pyproject.toml").write_text(text)
    (app_dir / "README.md").write_text(f"Test-only app bundle ({module}).\n")
    return app_dir


def test_a_bundle_run_as_its_own_user_reaches_nothing_of_the_centre(short_tmp, corpora, tmp_path):
    assert os.geteuid() == 0, "this red-team test needs root (CI runs as root): --app-user drops to 'nobody'"
    run_dir = short_tmp / "run"
    centres = make_centres(run_dir, corpora, 1)
    name = short_tmp.name
    probe = Path("/tmp") / f"{name}.probe"
    probe.mkdir(mode=0o777)
    probe.chmod(0o777)
    tcp, udp = _listen(probe)
    cfg = RunConfig.from_mapping({**load_defaults(), "model": "tiny", "rounds": 1, "inner-steps": 2, "batch-size": 2,
                                  "expected-centres": 1, "eval-batches": 1, "threads": 1, "round-timeout": 300.0,
                                  "run-dir": str(run_dir), "run-name": name})
    try:
        with LocalFederation(run_dir, centres, base_port=free_base_port(3), app_user=APP_USER) as fed:
            run = fed.wait(fed.submit(cfg.to_mapping(), app_dir=_bundle(tmp_path / "app", "prying_clientapp")),
                           timeout=600)
            assert run["status"] == "finished", run.get("message")
            found = json.loads((probe / f"{centres[0].name}.json").read_text())
            assert oct(centres[0].socket.stat().st_mode & 0o777) == "0o660"  # the bundles' group may relay
            # A second run, another bundle (the installed shell): a new app host; the prying one is gone.
            second = fed.wait(fed.submit(cfg.replace(run_name=f"{name}-2").to_mapping()), timeout=600)
            assert second["status"] == "finished", second.get("message")
    finally:
        reached = _reached(tcp, udp)
        shutil.rmtree(probe, ignore_errors=True)
    assert reached == [], reached  # nothing of the bundle's reached the centre's own loopback
    assert found.pop("netns") != os.readlink("/proc/self/ns/net")  # the app host had a namespace of its own
    assert found == {"uid": 65534, "read-data": "PermissionError", "list-data": "PermissionError",
                     "read-ledger": "PermissionError", "write-ledger": "PermissionError",
                     "list-run-state": "PermissionError", "write-state": "PermissionError",
                     "connect-data-plane": NO_NETWORK, "connect-listener": NO_NETWORK,
                     "resolve-connect-listener": NO_NETWORK, "udp-listener": NO_NETWORK}, found
    ledger = [json.loads(line) for line in (centres[0].state_dir / "egress-ledger.jsonl").read_text().splitlines()]
    checked = [(e["stage"], e["verdict"], e["op"]) for e in ledger if e["run"] == name and e["stage"] == "runtime"]
    assert ("runtime", "sent", "train") in checked, checked  # the runtime checked its reply against the worker's
    log = (run_dir / "logs" / f"supernode-{centres[0].name}.log").read_text()
    assert "submitted bundles get no network" in log, log[-2000:]  # the runtime's one line on it (clients/appnet.py)
    hosts = re.findall(r"app host pid (\d+) for bundle (\w+) .* as user nobody, no network", log)
    assert len(hosts) == 2 and hosts[0][1] != hosts[1][1], hosts
    with pytest.raises(ProcessLookupError):
        os.kill(int(hosts[0][0]), 0)
