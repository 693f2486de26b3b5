"""The headline command as a cluster runs it: one torchrun agent per host, ``--nnodes 4``, on
one machine made into four hosts (tests/multihost.py).

- four hosts in network namespaces joined by a bridge (on loopback addresses where namespaces
  cannot be made):
  ``configs/large.yaml`` (small-model overrides) with each host training from its own copy of
  the store, into one shared run directory, ends bit for bit where ``--standalone`` with four
  processes ends;
- a node lost (``--nnodes 3:4``): the remaining three re-form, resume from the last step
  checkpoint and finish with every particle trained on exactly once per epoch;
- the lost node coming back while the three train: the job re-forms with four, resumes and
  finishes, again every particle exactly once per epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from multihost import (
    REPO,
    check_exactly_once,
    children,
    free_port,
    kill_agent,
    listening_addresses,
    loopback_hosts,
    netns_hosts,
    netns_unavailable,
    read_trace,
    start_agent,
    start_standalone,
    stop_all,
    tails,
    wait_all,
    wait_until,
)

pytestmark = pytest.mark.multinode

LARGE = str(REPO / "configs" / "large.yaml")
EPOCHS = 2
SEED = 0  # large.yaml's train.seed (the default)
SHUFFLE_CHUNKS = 8  # large.yaml's train.shuffle_chunks
# After a node is lost, torchrun's agents do not agree on TORCHELASTIC_RESTART_COUNT: an agent
# whose workers were still healthy when the others re-entered the rendezvous restarts them as a
# membership change, which is not counted. Workers joining through the agent's store under an
# attempt_<restart count> prefix (distdrgn.runtime.init_restartable_process_group) then use
# different prefixes on different nodes, and one of them finds the dead round's gloo addresses.
# Without the shared store every round's rank 0 worker starts a fresh store on a fresh port.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# last_call: once three nodes are in, a round waits that long for a fourth. keep_alive: the
# remaining agents drop a node from the rendezvous after interval x attempts without its
# heartbeat, 15 s at torch's defaults (5 x 3); 6 s here is still far longer than a loaded agent
# goes between heartbeats, and a node loss then costs the test ~8 s instead of ~19.
ELASTIC_RDZV_CONF = "last_call_timeout=2,keep_alive_interval=2,keep_alive_max_attempt=3"


def train_args(store: Path, run: Path, trace: Path, tiny_overrides, step_delay_s: float = 0.0, **extra) -> list[str]:
    """large.yaml with a seconds-long model; the metrics port off (tests run side by side)."""
    settings = {"train.epochs": EPOCHS, "train.batch_size": 8, "train.num_workers": 0, "train.log_every": 1000,
                "metrics.port": "null", "debug.trace_samples": str(trace), "debug.step_delay_s": step_delay_s,
                **extra}
    return [LARGE, *tiny_overrides(store, run, **settings)]


def stage(store: Path, folder: Path) -> Path:
    """A host's node-local copy of the store (what launch/slurm_multinode.sbatch's STAGE_TO does)."""
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / store.name
    shutil.copytree(store, local)
    return local


@pytest.fixture(scope="module")
def store(small_dataset):
    from distdrgn.store import ParticleStore

    return ParticleStore.open(small_dataset["store"])


@pytest.fixture(scope="module")
def standalone_run(small_dataset, tiny_overrides, tmp_path_factory) -> Path:
    """The reference: ``torchrun --standalone --nproc_per_node 4`` on the shared store."""
    tmp = tmp_path_factory.mktemp("standalone")
    run, log = tmp / "run", tmp / "torchrun.log"
    proc = start_standalone(4, train_args(small_dataset["store"], run, tmp / "trace", tiny_overrides), log)
    try:
        assert wait_all([proc], [log]) == [0], tails([log])
    finally:
        stop_all([proc])
    return run


def assert_same_run(a: Path, b: Path) -> None:
    import torch

    from distdrgn.checkpoint import load_weights, load_z

    za, zb = load_z(a / "z.pkl"), load_z(b / "z.pkl")
    for x, y in zip(za, zb):
        np.testing.assert_array_equal(x, y)
    assert (a / "z.pkl").read_bytes() == (b / "z.pkl").read_bytes()
    wa, wb = load_weights(a / "weights.pkl"), load_weights(b / "weights.pkl")
    for k in wa["model_state_dict"]:
        assert torch.equal(wa["model_state_dict"][k], wb["model_state_dict"][k]), k


def test_four_hosts_end_bitwise_where_standalone_ends(small_dataset, tiny_overrides, standalone_run, tmp_path):
    """In network namespaces where the machine allows them (root, iproute2), else on loopback
    addresses: the namespaces are the stronger case (no host can reach another's sockets but
    through the bridge), and the node-loss tests below run on loopback addresses anyway."""
    network = "loopback" if netns_unavailable() else "netns"
    make_hosts = loopback_hosts if network == "loopback" else netns_hosts
    run, trace = tmp_path / "run", tmp_path / "trace"
    with make_hosts(4) as hosts:
        port = free_port()
        logs = [tmp_path / f"{h.name}.log" for h in hosts]
        procs = []
        try:
            for h, log in zip(hosts, logs):
                local = stage(small_dataset["store"], tmp_path / h.name / "local")  # each host's own copy
                # a small delay per step keeps the workers alive long enough to look at their sockets
                procs.append(start_agent(h, hosts, port, train_args(local, run, trace, tiny_overrides, 0.1), log,
                                         run_id=f"four-{network}"))

            def sockets_of_every_worker():
                """host -> addresses its worker listens on, once every worker listens (gloo)."""
                seen = {}
                for h, p in zip(hosts, procs):
                    addrs = set().union(*[listening_addresses(pid) for pid in children(p.pid)])
                    if not addrs:
                        return None
                    seen[h] = addrs
                return seen

            def training():
                return len(read_trace(trace)) and all(len(a["steps"]) >= 4 for a in read_trace(trace).values())

            wait_until(training, "all four workers training", procs, logs=logs)
            listening = wait_until(sockets_of_every_worker, "the workers' gloo sockets", procs, logs=logs)
            assert wait_all(procs, logs) == [0, 0, 0, 0], tails(logs)
        finally:
            stop_all(procs)
    # each host's worker listened on its own address only (gloo bound to GLOO_SOCKET_IFNAME)
    for h, addrs in listening.items():
        if h.gloo_ifname != "lo":  # not root: every worker's gloo is on 127.0.0.1
            assert addrs == {h.addr}, (h, addrs)
    attempts = read_trace(trace)
    assert len(attempts) == 1 and next(iter(attempts.values()))["world_size"] == 4
    assert len(next(iter(attempts.values()))["pids"]) == 4
    log_text = (run / "run.log").read_text()
    assert "4 process(es)" in log_text
    assert_same_run(standalone_run, run)


def test_a_node_lost_the_rest_reform_resume_and_see_each_particle_once(small_dataset, tiny_overrides, store,
                                                                       tmp_path):
    """``--nnodes 3:4``: host 4's agent and worker are SIGKILLed mid-epoch 1; the other three
    restart their workers (``--max-restarts``), re-form a 3-node group and resume from the
    newest step checkpoint."""
    from distdrgn.checkpoint import load_z

    run, trace = tmp_path / "run", tmp_path / "trace"
    with loopback_hosts(4) as hosts:
        port = free_port()
        logs = [tmp_path / f"{h.name}.log" for h in hosts]
        args = train_args(small_dataset["store"], run, trace, tiny_overrides, 0.15,
                          **{"train.checkpoint_every_steps": 2})
        procs = []
        try:
            for h, log in zip(hosts, logs):
                procs.append(start_agent(h, hosts, port, args, log, nnodes="3:4", run_id="node-lost",
                                         max_restarts=2, rdzv_conf=ELASTIC_RDZV_CONF, env=ELASTIC_ENV))

            def four_nodes_past_a_checkpoint():
                # three global steps (a step checkpoint after two) of a 4-process attempt
                return any(a["world_size"] == 4 and len(a["steps"]) >= 4 * 3 for a in read_trace(trace).values())

            wait_until(four_nodes_past_a_checkpoint, "four nodes training past a step checkpoint", procs, logs=logs)
            kill_agent(procs[3])
            assert wait_all(procs[:3], logs) == [0, 0, 0], tails(logs)
        finally:
            stop_all(procs)
    attempts = sorted(check_exactly_once(trace, store, EPOCHS, SEED, SHUFFLE_CHUNKS).values(),
                      key=lambda a: a["time"])
    sizes = [a["world_size"] for a in attempts]
    assert 4 in sizes and sizes[-1] == 3, sizes
    after = [a for a in attempts if a["time"] > max(b["time"] for b in attempts if b["world_size"] == 4)]
    assert after and after[0]["resume"] > (1, 0), "the three resumed from a step checkpoint, not from the start"
    assert after[0]["resume"][0] == 1, "the node was lost in epoch 1"
    log_text = (run / "run.log").read_text()
    assert "3 process(es)" in log_text and f"continuing at epoch 1, image {after[0]['resume'][1]}" in log_text
    # z.pkl: every particle, in store order, from the final weights
    from distdrgn.encode import encode_store
    from distdrgn.volumes import load_model

    z_mu, _ = load_z(run / "z.pkl")
    tm = load_model(run)
    assert tm.epoch == EPOCHS
    mu, _ = encode_store(tm.model, tm.prep, store, device="cpu")
    np.testing.assert_allclose(mu, z_mu, rtol=1e-4, atol=1e-5)


def test_a_lost_node_comes_back_and_the_job_reforms_with_four(small_dataset, tiny_overrides, store, tmp_path):
    """The same loss, then a new agent for host 4 while the other three train (``--nnodes
    3:4``). What torchrun does (torch 2.13): each running agent's monitor loop sees a node
    waiting in the rendezvous (``num_nodes_waiting() > 0``) and restarts its workers as a
    membership change (not counted against ``--max-restarts``): it sends them SIGTERM, so
    every rank stops at the same step and rank 0 writes a step checkpoint; then the four
    agents meet in a new round and their workers resume from that checkpoint. An agent whose
    worker stopped with the others before its own monitor loop looked restarts it as a failure."""
    run, trace, go = tmp_path / "run", tmp_path / "trace", tmp_path / "host4-back.go"
    with loopback_hosts(4) as hosts:
        port = free_port()
        logs = [tmp_path / f"{h.name}.log" for h in hosts]
        args = train_args(small_dataset["store"], run, trace, tiny_overrides, 0.25,
                          **{"train.checkpoint_every_steps": 2})
        # LOGLEVEL=INFO: torchrun's agents log what they do on a membership change
        agent = {"nnodes": "3:4", "run_id": "node-back", "max_restarts": 2, "rdzv_conf": ELASTIC_RDZV_CONF,
                 "env": {**ELASTIC_ENV, "LOGLEVEL": "INFO"}}
        procs = []
        try:
            for h, log in zip(hosts, logs):
                procs.append(start_agent(h, hosts, port, args, log, **agent))
            # host 4's replacement: started now so that its imports are done; it joins on `go`
            logs.append(tmp_path / "host4-back.log")
            procs.append(start_agent(hosts[3], hosts, port, args, logs[-1], go_file=go, **agent))

            def training_with(world_size: int):
                return lambda: any(a["world_size"] == world_size and len(a["steps"]) >= world_size * 3
                                   for a in read_trace(trace).values())

            wait_until(training_with(4), "four nodes training past a step checkpoint", procs, logs=logs)
            kill_agent(procs[3])
            survivors = [*procs[:3], procs[4]]
            wait_until(training_with(3), "the three re-formed and training", survivors, logs=logs)
            go.touch()  # the node comes back while the three train
            assert wait_all(survivors, logs) == [0, 0, 0, 0], tails(logs)
        finally:
            stop_all(procs)
    attempts = sorted(check_exactly_once(trace, store, EPOCHS, SEED, SHUFFLE_CHUNKS).values(),
                      key=lambda a: a["time"])
    sizes = [a["world_size"] for a in attempts]
    assert sizes[0] == 4 and sizes[-1] == 4 and 3 in sizes, sizes
    three = next(a for a in attempts if a["world_size"] == 3)
    back = attempts[-1]
    assert back["time"] > three["time"] and back["resume"] > three["resume"] > (1, 0), (three, back)
    assert len(back["pids"]) == 4  # a fresh process on each of the four hosts
    log_text = (run / "run.log").read_text()
    # the three's workers were stopped by their agents (SIGTERM) and checkpointed where the four resume
    assert f"image {back['resume'][1]} of {store.n}); rerun the same command to resume" in log_text
    assert f"continuing at epoch {back['resume'][0]}, image {back['resume'][1]}" in log_text
    assert log_text.count("4 process(es)") >= 2 and log_text.count("3 process(es)") >= 1, log_text
    # The three agents' monitor loops poll every 0.2 s. The first to see the waiting node SIGTERMs
    # its worker, and the three ranks agree to stop at the next step; an agent whose worker has
    # already exited that way (128 + 15) before its own poll restarts it as a failure (counted
    # against --max-restarts) instead. Which agent takes which path is up to the scheduler; at
    # least one saw the node, and every one of the three started its workers again.
    texts = [log.read_text(errors="replace") for log in logs[:3]]
    assert any("Detected 1 new nodes from group_rank=" in t for t in texts), tails(logs[:3])
    for log, text in zip(logs[:3], texts):
        assert text.count("Starting worker group") >= 3, tails([log])  # 4 nodes, 3 nodes, 4 nodes
