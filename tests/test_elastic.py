"""torchrun restarts and lost peers, end to end: two torchrun agents on this machine as two "nodes" (c10d
rendezvous on 127.0.0.1, one gloo worker each, ``--norm syncbatch``, deterministic CPU training).

- A worker killed with SIGKILL after a checkpoint was written, under ``--max-restarts 1``: torchrun restarts
  both workers, they resume from ``latest.pt``, say so on both machines, and the run ends bit-identical
  to an uninterrupted two-node run (weights, optimizers, schedules, position, every rank's generators,
  the loss log).
- The same kill without restarts: the surviving worker stops within seconds, with one line naming the
  lost rank and the last checkpoint, and exit status 1.
- In one process (the test sets ``TORCHELASTIC_RESTART_COUNT``): a restart resumes from ``latest.pt`` past
  the leftovers of an interrupted save, or starts over where there is none.
- The one-line description of gloo's errors, and the command line's error line and ``--debug``.

Every process a two-node test starts carries a tag in its environment. Whatever happens, the test kills
every process with the tag (torchrun starts its workers in sessions of their own) and each agent's process
group at the end, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import free_port
from tiny_run import assert_same, tiny_options

from fastpix2pix import cli
from fastpix2pix.commands import train as train_command
from fastpix2pix.data.synthetic import generate_synthetic_facades
from fastpix2pix.runs.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    plain_network_path,
    stale_temporaries,
)
from fastpix2pix.training.distributed import DistContext, PeerInfo, PeerLostError, describe_peer_failure
from fastpix2pix.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TAG_VARIABLE = "FASTPIX2PIX_TEST_ELASTIC_TAG"
RUN_TIMEOUT_S = 150  # a two-node run, restart included, on a shared 2-core machine (~15-25 s measured)
DIST_TIMEOUT_S = 20
N_TRAIN = 8  # 2 processes x batch 1: 4 iterations an epoch, 2 epochs, a latest.pt every 2 iterations
TOTAL_ITERATIONS = 8
STATE_KEYS = ["G", "D", "optimizer_G", "optimizer_D", "scheduler_G", "scheduler_D", "epoch", "epoch_iter",
              "images", "iteration", "epoch_loss_sums", "epoch_loss_count"]  # fmt: skip

two_nodes_only = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and hasattr(signal, "SIGKILL")),
    reason="needs Linux (/proc, to find torchrun's workers) and POSIX signals",
)


# --- two torchrun agents on loopback ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_facades(tmp_path_factory.mktemp("elastic_data"), N_TRAIN, 1, 32, seed=0)


def train_arguments(data: Path, checkpoints: Path, name: str) -> list[str]:
    return [
        "train", "--dataroot", str(data), "--direction", "BtoA", "--name", name,
        "--checkpoints_dir", str(checkpoints), "--netG", "resnet_6blocks", "--ngf", "4", "--ndf", "4",
        "--load_size", "36", "--crop_size", "32", "--batch_size", "1", "--n_epochs", "1",
        "--n_epochs_decay", "1", "--num_threads", "0", "--backend", "reference", "--device", "cpu",
        "--seed", "3", "--deterministic", "--norm", "syncbatch", "--print_freq", "2", "--display_freq", "100",
        "--save_latest_freq", "4", "--save_epoch_freq", "0", "--dist_timeout", str(DIST_TIMEOUT_S),
    ]  # fmt: skip


@dataclass
class TwoNodes:
    """Two torchrun agents (0 hosts the rendezvous store) of one run, and where their output goes."""

    agents: list[subprocess.Popen]
    outputs: list[Path]
    tag: str
    run_dir: Path

    def output(self, agent: int) -> str:
        return self.outputs[agent].read_text(errors="replace")

    def workers(self) -> dict[int, dict[str, str]]:
        """The live workers of this run (pid -> environment): tagged processes with a RANK."""
        return {pid: env for pid, env in _tagged_processes(self.tag).items() if "RANK" in env}

    def worker(self, choose: Callable[[int, dict[str, str]], bool]) -> int:
        chosen = [pid for pid, env in self.workers().items() if choose(pid, env)]
        assert len(chosen) == 1, f"expected one worker, found {chosen} among {self.workers()}"
        return chosen[0]

    def wait(self) -> list[int]:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for agent in self.agents:
            try:
                agent.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the agents were still running after {RUN_TIMEOUT_S} s:\n{self.describe()}")
        return [agent.returncode for agent in self.agents]

    def describe(self) -> str:
        return "\n".join(f"--- agent {i}:\n{self.output(i)[-4000:]}" for i in range(len(self.agents)))


@contextlib.contextmanager
def two_nodes(data: Path, checkpoints: Path, name: str, max_restarts: int) -> Iterator[TwoNodes]:
    """Two torchrun agents (--nnodes 2, a worker each) on 127.0.0.1; what is left is killed at the end."""
    tag = secrets.token_hex(8)
    env = os.environ | {
        TAG_VARIABLE: tag, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
    }  # fmt: skip
    port = free_port()
    outputs = [checkpoints / f"{name}.agent{i}.out" for i in range(2)]
    checkpoints.mkdir(parents=True, exist_ok=True)
    agents: list[subprocess.Popen] = []
    try:
        for i, output in enumerate(outputs):
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name,
                "--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr", "127.0.0.1",
                "--max_restarts", str(max_restarts), "--monitor_interval", "0.1",
                "-m", "fastpix2pix", *train_arguments(data, checkpoints, name),
            ]  # fmt: skip
            with output.open("w") as file:
                agents.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdout=file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield TwoNodes(agents, outputs, tag, checkpoints / name)
    finally:
        for pid in _tagged_processes(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for agent in agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(agent.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(10)


def _tagged_processes(tag: str) -> dict[int, dict[str, str]]:
    """Every live process whose environment carries ``tag`` (pid -> environment)."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in raw.split(b"\0") and state != "Z":
            items = raw.decode(errors="replace").split("\0")
            found[int(entry.name)] = dict(item.split("=", 1) for item in items if "=" in item)
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_after_checkpoint(nodes: TwoNodes, choose: Callable[[int, dict[str, str]], bool]) -> tuple[int, dict]:
    """SIGKILL the chosen worker once the run's first latest.pt exists (stopped first, with SIGSTOP, so that
    it writes nothing more while the checkpoint is read); returns its pid and that checkpoint."""
    latest = checkpoint_path(nodes.run_dir, "latest")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not latest.exists():
        if time.monotonic() > deadline or any(agent.poll() is not None for agent in nodes.agents):
            pytest.fail(f"no checkpoint before the agents ended or the time ran out:\n{nodes.describe()}")
        time.sleep(0.005)
    victim = nodes.worker(choose)
    os.kill(victim, signal.SIGSTOP)
    try:
        state = load_checkpoint(latest)
    finally:
        os.kill(victim, signal.SIGKILL)
    assert 0 < state["iteration"] < TOTAL_ITERATIONS, "killed too late to test anything"
    return victim, state


def _loss_records(run_dir: Path) -> list[dict[str, Any]]:
    """The loss log without its timings."""
    records = [json.loads(line) for line in (run_dir / "loss_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_per_iter", "data_time")} for r in records]


@pytest.fixture(scope="module")
def straight_run(eight_pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted two-node run's folder."""
    checkpoints = tmp_path_factory.mktemp("elastic_straight")
    with two_nodes(eight_pairs, checkpoints, "straight", max_restarts=0) as nodes:
        assert nodes.wait() == [0, 0], nodes.describe()
    return nodes.run_dir


@two_nodes_only
@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_killed_worker_is_restarted_and_resumes_bit_identically(
    eight_pairs: Path, straight_run: Path, tmp_path: Path
) -> None:
    """Rank 0's worker (the writer; it hosts the group's store) is killed after the first save. torchrun
    restarts both workers (one agent for the failure, the other for the membership change: its worker sees
    restart count 0), both resume from latest.pt, and the run ends as the uninterrupted one did."""
    with two_nodes(eight_pairs, tmp_path, "restarted", max_restarts=1) as nodes:
        _, at_kill = kill_after_checkpoint(nodes, lambda pid, env: env["RANK"] == "0")
        codes = nodes.wait()
        assert codes == [0, 0], nodes.describe()
    latest = checkpoint_path(nodes.run_dir, "latest")
    said = (
        f"torchrun restart 1: resumed from {latest}: epoch {at_kill['epoch']}, {at_kill['epoch_iter']} "
        f"images into it, iteration {at_kill['iteration']}"
    )
    log = (nodes.run_dir / "log.txt").read_text()
    assert said in log
    # The restarted workers trained only what was left (the start-up lines count the iterations to do).
    left = TOTAL_ITERATIONS - at_kill["iteration"]
    assert re.findall(r"seed 3: (\d+) iterations", log) == [str(TOTAL_ITERATIONS), str(left)], log
    for agent in range(2):  # each machine's console says it (rank 0's, and the other's first process)
        assert nodes.output(agent).count(said) == 1, nodes.describe()

    resumed, straight = load_checkpoint(latest), load_checkpoint(checkpoint_path(straight_run, "latest"))
    assert resumed["iteration"] == straight["iteration"] == TOTAL_ITERATIONS
    for key in STATE_KEYS:
        assert_same(resumed[key], straight[key], key)
    # Every rank's generators but the DataLoader's, which only seeds worker processes (none here) and is
    # drawn from once per epoch iterator: once more after a resume.
    assert len(resumed["rng_ranks"]) == 2
    for rank, (ours, theirs) in enumerate(zip(resumed["rng_ranks"], straight["rng_ranks"], strict=True)):
        for name in ours.keys() - {"loader"}:
            assert_same(ours[name], theirs[name], f"rng_ranks[{rank}].{name}")
    # The loss log goes on from the checkpoint: the records past it were redone, none from iteration 1 again.
    assert _loss_records(nodes.run_dir) == _loss_records(straight_run)
    assert stale_temporaries(nodes.run_dir) == []


@two_nodes_only
@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_survivor_of_a_killed_worker_stops_with_one_line(eight_pairs: Path, tmp_path: Path) -> None:
    """No restarts: the worker of agent 1 is killed after the first save. The other one stops within
    seconds (gloo sees the closed connection), exit status 1, with one line naming the lost rank and the
    last checkpoint and how to resume, and no traceback."""
    with two_nodes(eight_pairs, tmp_path, "lost", max_restarts=0) as nodes:
        host_agent = nodes.agents[0].pid
        victim, at_kill = kill_after_checkpoint(nodes, lambda pid, env: _parent(pid) != host_agent)
        killed_at = time.monotonic()
        survivor = nodes.worker(lambda pid, env: pid != victim)
        while _alive(survivor) and time.monotonic() - killed_at < RUN_TIMEOUT_S:
            time.sleep(0.01)
        stopped_after_s = time.monotonic() - killed_at
        codes = nodes.wait()
    output = nodes.output(0)
    assert codes[0] != 0 and codes[1] != 0, nodes.describe()
    assert stopped_after_s < DIST_TIMEOUT_S, f"the survivor took {stopped_after_s:.1f} s to stop"
    # torchrun's summary of the failure shows the survivor's own exit status (not a signal from its agent)
    assert re.search(rf"exitcode\s*:\s*1 \(pid: {survivor}\)", output), output
    lines = [line for line in output.splitlines() if "fastpix2pix train: error:" in line]
    assert len(lines) == 1, output
    line = lines[0]
    latest = checkpoint_path(nodes.run_dir, "latest")
    assert re.search(rf"of 2: rank \d \(host [^,]+, pid {victim}\) is gone \(", line), line
    assert f"Last checkpoint: {latest} (epoch {at_kill['epoch']}, iteration {at_kill['iteration']})" in line
    assert "rerun the same command with --continue_train" in line and "--debug" in line
    assert not re.search(r'File ".*fastpix2pix', output), "a traceback of the worker was printed"


# --- a restart in one process -------------------------------------------------------------------------------


def restart_options(data: Path, checkpoints: Path, **changes: Any) -> Any:
    """6 iterations of batch 1 over 4 pairs (into the second epoch), a latest.pt every 2 images."""
    opt = tiny_options(data, checkpoints, batch_size=1, max_iters=6, print_freq=1, save_latest_freq=2,
                       save_epoch_freq=0, display_freq=1000)  # fmt: skip
    return replace(opt, **changes)


def _fit(opt: Any) -> Trainer:
    trainer = Trainer(opt, progress_bar=False)
    trainer.fit()
    return trainer


@pytest.mark.usefixtures("one_thread")
def test_restart_resumes_from_latest_past_an_interrupted_save(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process restarted by torchrun (without --continue_train) continues from latest.pt, not from the newer
    files a save cut short leaves (network files and epoch_N.pt are written before latest.pt, the commit
    point), and ends as an uninterrupted run; the network files are rewritten, the temporaries removed."""
    straight = _fit(restart_options(tiny_data, tmp_path / "straight"))
    restarted = tmp_path / "restarted"
    _fit(restart_options(tiny_data, restarted, max_iters=3))
    run_dir = restarted / "tiny"
    # A save killed part-way after its network files and an epoch_1.pt (of a later position) were written.
    later = straight.run_dir
    for net in "GD":
        (run_dir / f"latest_net_{net}.pth").write_bytes(plain_network_path(later, "latest", net).read_bytes())
    (run_dir / "epoch_1.pt").write_bytes(checkpoint_path(later, "latest").read_bytes())
    (run_dir / ".latest.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    resumed = _fit(restart_options(tiny_data, restarted))
    log = (run_dir / "log.txt").read_text()
    assert (
        f"torchrun restart 1: resumed from {run_dir / 'latest.pt'}: epoch 1, 3 images into it, iteration 3"
        in log
    )
    assert resumed.state.iteration == 6 and stale_temporaries(run_dir) == []
    ours, theirs = load_checkpoint(run_dir / "latest.pt"), load_checkpoint(later / "latest.pt")
    for key in STATE_KEYS:
        assert_same(ours[key], theirs[key], key)
    for net in "GD":
        assert_same(
            torch.load(plain_network_path(run_dir, "latest", net)),
            torch.load(plain_network_path(later, "latest", net)),
            f"latest_net_{net}.pth",
        )


@pytest.mark.usefixtures("one_thread")
def test_restart_without_a_checkpoint_starts_over(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    trainer = _fit(restart_options(tiny_data, tmp_path, max_iters=2, save_latest_freq=1000))
    log = (trainer.run_dir / "log.txt").read_text()
    assert f"torchrun restart 2: no checkpoint in {trainer.run_dir} yet (no latest.pt): starting over" in log
    assert "resumed from" not in log and trainer.state.iteration == 2
    assert [r["iter"] for r in _loss_records(trainer.run_dir)] == [1, 2]


# --- the lost peer in words ---------------------------------------------------------------------------------

GLOO_CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[127.0.0.1]:10423. This is typically caused by a remote worker crashing. Check the logs of the remote "
    "worker before reporting an error."
)
GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.0.0.7]:6001: "
    "Connection reset by peer"
)
GLOO_TIMEOUT = (
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv "
    "operation to complete"
)


def _group(world_size: int, rank: int = 0) -> DistContext:
    peers = tuple(PeerInfo(r, f"node{r // 2}", 100 + r, (f"10.0.0.{r // 2 + 7}",)) for r in range(world_size))
    return DistContext(rank, world_size, rank, torch.device("cpu"), False, peers, DIST_TIMEOUT_S)


def test_describe_peer_failure() -> None:
    two = _group(2)
    assert describe_peer_failure(two, RuntimeError(GLOO_CLOSED)) == (
        "rank 1 (host node0, pid 101) is gone (Connection closed by peer [127.0.0.1]:10423)"
    )
    try:  # found through the chain of causes (e.g. DDP's error raised from gloo's)
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as inner:
            raise ValueError("while training") from inner
    except ValueError as outer:
        assert describe_peer_failure(two, outer) is not None
    timeout = describe_peer_failure(two, RuntimeError(GLOO_TIMEOUT))
    assert timeout == (
        "rank 1 (host node0, pid 101) did not answer within --dist_timeout 20 s: it hangs or died (Timed out "
        "waiting 20000ms for recv operation to complete)"
    )
    # More processes: named by the peer's address where one rank has it, else left open.
    four = _group(4, rank=0)  # ranks 0 and 1 on node0 (10.0.0.7), 2 and 3 on node1 (10.0.0.8)
    assert describe_peer_failure(four, RuntimeError(GLOO_RESET)) == (
        "rank 1 (host node0, pid 101) is gone (Read error [10.0.0.7]:6001: Connection reset by peer)"
    )
    other_node = RuntimeError(GLOO_RESET.replace("10.0.0.7", "10.0.0.8"))
    assert describe_peer_failure(four, other_node).startswith(
        "one of ranks [2, 3] (host node1, at 10.0.0.8) is"
    )
    assert describe_peer_failure(four, RuntimeError(GLOO_CLOSED)).startswith(
        "the process at 127.0.0.1 is gone"
    )
    # Not a collective's failure
    assert describe_peer_failure(two, RuntimeError("CUDA out of memory")) is None
    assert describe_peer_failure(two, ValueError("the data loader timed out")) is None


def test_lost_peer_is_one_line_or_a_traceback_with_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def lose_a_peer(opt: Any) -> Any:
        raise PeerLostError("rank 0 (host a, pid 1) of 2: rank 1 (host b, pid 2) is gone (...)") from (
            RuntimeError(GLOO_CLOSED)
        )

    monkeypatch.setattr(train_command, "run_training", lose_a_peer)
    assert cli.main(["train", "--dataroot", "x"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "fastpix2pix train: error: rank 0 (host a, pid 1) of 2: rank 1 (host b, pid 2) is gone (...)\n"
    )
    with pytest.raises(PeerLostError) as raised:
        cli.main(["train", "--dataroot", "x", "--debug"])
    assert isinstance(raised.value.__cause__, RuntimeError)
