"""Intruders at the shipped security settings (TLS + SuperNode authentication), one real
federation and one round (tiny model): an unregistered key, a plaintext connection, a SuperNode
trusting another CA, and a second SuperNode reusing a live centre's key are each refused with
their own error, are never activated, and never receive the model; the two centres train.

Then what a reused key can do once its centre is offline (Flower 1.41: the key *is* the node's
identity), and the operator's remedy: `flwr supernode unregister` cuts the holder off at once,
and that key can never be registered again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from deploy import commands
from deploy.local import Centre, LocalFederation
from deploy.processes import ProcessGroup, venv_bin
from deploy.register import supernode_refusal
from tests.conftest import free_base_port, make_centres
from tests.test_multinode import one_round

DEPLOY = str(Path(__file__).resolve().parent.parent / "deploy")

NODE_ID = re.compile(r"SuperNode ID: (\d+)")  # a SuperNode's log, once the SuperLink activated it
ACTIVATED = re.compile(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)")  # the SuperLink's log
TRAIN = "Receiving: train message"  # a SuperNode's log, as it pulls the round's model


def make_pki(root: Path, centres: list[str]) -> commands.Pki:
    pki = commands.Pki(root)
    for argv, env in commands.pki_steps(DEPLOY, pki, centres, ["DNS:localhost", "IP:127.0.0.1"]):
        subprocess.run(argv, env={**os.environ, **env}, check=True, capture_output=True)
    return pki


def node_id(log: Path, proc_alive=lambda: True, timeout: float = 180) -> int:
    """The node id a SuperNode logs once activated."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc_alive():
        found = NODE_ID.search(log.read_text(errors="replace") if log.exists() else "")
        if found:
            return int(found.group(1))
        time.sleep(0.3)
    raise AssertionError(f"no SuperNode ID in {log}:\n{log.read_text(errors='replace')[-1500:]}")


def test_intruders_are_refused_and_never_get_the_model(tmp_path, corpora):
    run_dir = tmp_path / "run"
    centres = make_centres(run_dir, corpora, 2)
    a, b = centres
    pki = make_pki(tmp_path / "pki", [a.name, b.name, "rogue"])  # rogue: a key nobody registered
    foreign = make_pki(tmp_path / "foreign-pki", [])  # another CA, which signed nothing of ours
    base = free_base_port(8)
    with LocalFederation(run_dir, centres, base_port=base, pki=pki) as fed:
        assert "insecure = true" not in (fed.server_home / "config.toml").read_text()
        ids = {c.name: node_id(fed.logs / f"supernode-{c.name}.log") for c in centres}  # both centres live
        rogue = Centre("rogue", tmp_path / "rogue" / "data", tmp_path / "rogue" / "state")
        wrong_ca = fed.supernode_argv(b, base + 5, max_retries=1)  # b's registered key, another CA
        wrong_ca[wrong_ca.index("--root-certificates") + 1] = foreign.ca_cert
        attempts = {
            "unregistered": fed.supernode_argv(rogue, base + 3, max_retries=1),
            "no-tls": fed.supernode_argv(a, base + 4, pki=None, insecure=True, max_retries=1),
            "wrong-ca": wrong_ca,
            "reused-key": fed.supernode_argv(a, base + 6, max_retries=1),  # a's key while a is online
        }
        intruders = ProcessGroup()  # their SuperExec children outlive them: stopped with the group
        try:
            procs = {k: intruders.start(k, argv, tmp_path / "logs" / f"{k}.log", fed._env(tmp_path / "homes" / k))
                     for k, argv in attempts.items()}
            run = fed.wait(fed.submit(one_round(run_dir).to_mapping()), timeout=600)
            codes = {k: proc.popen.wait(120) for k, proc in procs.items()}
            logs = {k: proc.log.read_text(errors="replace") for k, proc in procs.items()}
            superlink_log = (run_dir / "logs" / "superlink.log").read_text(errors="replace")
            legit_logs = {c.name: (fed.logs / f"supernode-{c.name}.log").read_text() for c in centres}
            fed.register([pki.public_key(a.name)])  # again (a compose restart): not an error
            takeover = _take_over_offline_centre(fed, a, ids[a.name], base + 7, intruders, tmp_path)
        finally:
            intruders.stop_all()

    # The two centres, and only they, were activated and trained.
    assert run["status"] == "finished", run.get("message")
    assert run["rounds"][0]["replied"] == 2 and set(run["final"]["centres"]) == {a.name, b.name}
    # Their names came from the keys the SuperLink authenticated them with (server/identity.py), not their replies.
    assert [e for e in run["events"] if e["event"] == "centre-names"][0]["pinned"] is True
    assert Counter(map(int, ACTIVATED.findall(superlink_log))) == Counter(ids.values()), superlink_log[-3000:]
    assert all(TRAIN in log for log in legit_logs.values())
    # Each intruder: exit 305 before activation (no node id), no model, and its own reason.
    for k, log in logs.items():
        assert codes[k] != 0 and "Exit Code: 305" in log, (k, codes[k], log[-800:])
        assert "SuperNode ID" not in log and TRAIN not in log, (k, log[-800:])
    assert "not registered" in (supernode_refusal(logs["unregistered"]) or ""), logs["unregistered"][-800:]
    assert "exception: No SuperNode found with the given public key" in superlink_log
    assert "without TLS" in (supernode_refusal(logs["no-tls"]) or ""), logs["no-tls"][-800:]
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in logs["wrong-ca"], logs["wrong-ca"][-800:]
    assert "does not verify against --root-certificates" in (supernode_refusal(logs["wrong-ca"]) or "")
    # The reused key: the SuperNode is told only "Failed to activate" (as for an unregistered key);
    # the SuperLink's log names the cause: the key's node is already online.
    assert "[code: 2004] Failed to activate SuperNode." in logs["reused-key"], logs["reused-key"][-800:]
    assert f"exception: SuperNode with node ID {ids[a.name]} could not be activated." in superlink_log
    assert "https://" in superlink_log and "http://127.0.0.1" not in superlink_log

    # Once the centre is offline, its key admits whoever holds it, as that centre; unregistering
    # the node cuts the holder off at its next request, and the key stays unusable for good.
    assert takeover["node-id"] == ids[a.name]
    assert takeover["code"] == 0 and 'POST /v1/fleet/pull-messages HTTP/1.1" 401' in takeover["superlink"]
    assert "unregistered successfully" in takeover["unregister"], takeover["unregister"]
    assert "Public key already in use" in takeover["re-register"], takeover["re-register"]


def _take_over_offline_centre(fed: LocalFederation, c: Centre, legit_id: int, port: int,
                              group: ProcessGroup, tmp_path: Path) -> dict:
    """Stop `c`'s SuperNode cleanly (it deactivates its node), start another SuperNode with `c`'s
    key, then unregister the node at the SuperLink and try to register the key again."""
    legit = next(p for p in fed.group.procs if p.name == f"SuperNode {c.name}")
    os.killpg(legit.popen.pid, signal.SIGTERM)
    legit.popen.wait(30)
    holder = group.start("key holder", fed.supernode_argv(c, port), tmp_path / "logs" / "key-holder.log",
                         fed._env(tmp_path / "homes" / "key-holder"))
    out = {"node-id": node_id(holder.log, holder.alive)}
    env, flwr = fed._env(fed.server_home), venv_bin("flwr")

    def cli(*args: str) -> str:
        done = subprocess.run([flwr, "supernode", *args], capture_output=True, text=True, env=env,
                              cwd=fed.run_dir, timeout=60, stdin=subprocess.DEVNULL)
        return done.stdout + done.stderr

    out["unregister"] = cli("unregister", str(legit_id), "bridgepool")
    out["code"] = holder.popen.wait(60)  # cut off: 401 on its next pull, it shuts down
    out["re-register"] = cli("register", fed.pki.public_key(c.name), "bridgepool", "--format", "json")
    out["superlink"] = (fed.logs / "superlink.log").read_text(errors="replace")
    return out
