"""The caption job on a simulated multi-node cluster: lost nodes, restarted actors, killed drivers.

One `ray.cluster_utils.Cluster` for the module: a head without CPUs (the driver's node) and worker
nodes with 1 CPU and 1 (pretend) GPU each, like the head and the spot GPU workers of cluster/rayjob.yaml.
The job asks for `--gpus-per-actor 1 --cpus-per-actor 0`, so each worker runs one caption actor next to
one CPU task (prepare or write); the actors still caption on the CPU (`--device cpu`, the embedded
model), with the HF engine, and in the poison-window test with the vLLM engine too where vLLM is installed.

Every node has its own Ray temp dir and its own TMPDIR (set in the environment its raylet, hence its
workers, start with), so a file one node writes into its temporary folder is not where another node
looks: node-local state cannot pass for shared state. Only the output folder is shared, as an object
store bucket would be.

Every job runs as a subprocess driver (`python -m pipelines.caption --ray-address ...`), with a TMPDIR
of its own: the test process itself never joins the cluster (so it does not disturb the session's
local cluster of conftest.ray_cluster either). Faults come from AVSIEVE_FAULT_* (operators/faults.py);
AVSIEVE_FAULT_TRACE records every model call with its node, which tells where windows were captioned
and how many were captioned twice.

Cleanup kills exactly what this module started: the drivers' sessions and the cluster's nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from operators.schema import OUTPUT_SCHEMA
from operators.sink import read_output

import media
from conftest import REPO_ROOT, vllm_or_skip
from test_faults import kill_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAPTION_ACTOR = "JournaledCaptionActor"  # Ray Data names the actor class MapWorker(MapBatches(...))


def wait_for(check, what: str, timeout: float = 120.0, driver=None, interval: float = 0.2):
    """check()'s first truthy value; fails after `timeout` s, or as soon as the driver ended."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if driver is not None and driver.proc.poll() is not None:
            raise AssertionError(f"driver ended (rc {driver.proc.returncode}) before {what}:\n{driver.log()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{driver.log()}" if driver else ""))
        time.sleep(interval)


class SimCluster:
    """A head and named worker nodes, each with its own Ray temp dir and TMPDIR."""

    def __init__(self, base: Path):
        from ray.cluster_utils import Cluster

        self.base = base
        self.tmpdirs: dict[str, Path] = {"head": self._tmpdir("head")}
        self.workers = {}  # name -> ray._private.node.Node, live workers only
        self.count = 0
        with self._node_env("head"):
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
                num_cpus=0, num_gpus=0, temp_dir=str(base / "ray-head"), include_dashboard=False))
        self.address = self.cluster.address
        self.state = self.cluster.global_state

    def _tmpdir(self, name: str) -> Path:
        path = self.base / f"tmp-{name}"
        path.mkdir()
        return path

    def _node_env(self, name: str):
        """Around starting a node in this process: the environment its processes start with (its own
        TMPDIR, its name for the trace), and this process's Ray internal-KV client kept as it was.

        Ray's Node() points this process's internal KV at the new node's GCS; the session's local cluster
        (conftest.ray_cluster) would then export functions to the simulated head, and once that head is gone
        this process waits on it and ends itself after 60 s. RAY_AUTH_MODE: a local ray.init() earlier in
        this process sets it to "token" in os.environ; nodes inheriting it would refuse the drivers, which
        start without RAY_* variables."""
        from ray.experimental import internal_kv

        env = {"TMPDIR": str(self.tmpdirs[name]), "AVSIEVE_TEST_NODE": name, "RAY_AUTH_MODE": "disabled"}

        class Scope:
            def __enter__(self):
                self.saved = {k: os.environ.get(k) for k in env}
                self.kv = (internal_kv.global_gcs_client, internal_kv._initialized)
                os.environ.update(env)

            def __exit__(self, *exc):
                for k, v in self.saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                internal_kv.global_gcs_client, internal_kv._initialized = self.kv

        return Scope()

    def add_worker(self) -> str:
        self.count += 1
        name = f"w{self.count}"
        self.tmpdirs[name] = self._tmpdir(name)
        with self._node_env(name):
            self.workers[name] = self.cluster.add_node(num_cpus=1, num_gpus=1, temp_dir=str(self.base / f"ray-{name}"))
        return name

    def name_of(self, node_id: str) -> str | None:
        if node_id == self.cluster.head_node.node_id:
            return "head"
        return next((name for name, node in self.workers.items() if node.node_id == node_id), None)

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)  # as when the VM is reclaimed

    def drain(self, name: str) -> None:
        """A preemption notice: the node takes no new work (what the autoscaler does before a spot node goes)."""
        import ray
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=self.address)
        accepted, message = gcs.drain_node(self.workers[name].node_id,
                                           autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                           "test: spot preemption notice", 0)
        assert accepted, message

    def caption_actors(self) -> list[dict]:
        """Live caption actors: [{"node": name, "pid": pid}]."""
        return [{"node": self.name_of(a["Address"]["NodeID"]), "pid": a["Pid"]}
                for a in self.state.actor_table(None).values()
                if CAPTION_ACTOR in a["ActorClassName"] and a["State"] == "ALIVE"]

    def free_cpus(self, name: str) -> float:
        node = self.workers.get(name) or self.cluster.head_node
        return self.state.available_resources_per_node().get(node.node_id, {}).get("CPU", 0.0)

    def shutdown(self) -> None:
        # Node by node rather than Cluster.shutdown(), which also resets this process's Ray internal KV
        # (the session's own local cluster may be connected in this process).
        self.state.disconnect()  # its GCS client would wait on the head that is about to go
        for name in list(self.workers):
            self.remove(name)
        self.cluster.remove_node(self.cluster.head_node)


@pytest.fixture(scope="module")
def sim():
    base = Path(tempfile.mkdtemp(prefix="avmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    saved = os.environ.get("RAY_TMPDIR")
    # Cluster() records its address in RAY_TMPDIR/ray/: keep it out of the machine's /tmp/ray, where other
    # people's `ray.init(address="auto")` would find it.
    os.environ["RAY_TMPDIR"] = str(base / "ray-home")
    (base / "ray-home" / "ray").mkdir(parents=True)
    cluster = None
    try:
        cluster = SimCluster(base)
        cluster.add_worker()
        cluster.add_worker()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """11 one-window clips, one 3-window clip and a one-window poison.mp4."""
    folder = tmp_path_factory.mktemp("mn-clips")
    for i in range(11):
        media.write_clip(folder / f"c{i}.mp4", seconds=2.0)
    media.write_clip(folder / "long.mp4", seconds=9.0, fps=5)
    media.write_clip(folder / "poison.mp4", seconds=2.0)
    return folder


def input_folder(clips: Path, dest: Path, names: list[str]) -> Path:
    dest.mkdir()
    for name in names:
        shutil.copy(clips / name, dest / name)
    return dest


ELEVEN_AND_LONG = [f"c{i}.mp4" for i in range(11)] + ["long.mp4"]  # 14 windows in 3 prepare tasks of 4 inputs


class Driver:
    """`python -m pipelines.caption` against the simulated cluster, in its own session, with its own TMPDIR."""

    def __init__(self, sim: SimCluster, input: Path, output: Path, tmpdir: Path, *flags: str, engine: str = "hf",
                 **faults: str):
        self.tmpdir = tmpdir
        tmpdir.mkdir(exist_ok=True)
        argv = ["--input", str(input), "--output", str(output), "--window-s", "4", "--max-new-tokens", "4",
                "--progress", "false", "--engine", engine, "--device", "cpu", "--gpus-per-actor", "1",
                "--cpus-per-actor", "0", "--prepare-cpus", "1", "--ray-address", sim.address, *flags]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AVSIEVE_"))}
        env.update(RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1",
                   **{f"AVSIEVE_FAULT_{k.upper()}": str(v) for k, v in faults.items()})
        self.log_path = tmpdir.parent / f"{tmpdir.name}.log"  # beside the driver's TMPDIR, not in it
        self.started = time.time()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.caption", *argv], cwd=REPO_ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text()[-tail:]

    def wait(self, timeout: float = 90) -> dict:
        """The job's summary; fails unless the driver exits 0."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("driver still running:\n" + self.log()) from None
        finally:
            self.seconds = time.time() - self.started
        assert self.proc.returncode == 0, self.log()
        lines = [line for line in self.log_path.read_text().splitlines() if line.startswith('{"summary"')]
        assert lines, self.log()
        return json.loads(lines[-1])["summary"]

    def kill(self) -> None:
        kill_session(self.proc.pid)  # start_new_session: the session id is the driver's pid
        self.proc.wait(timeout=30)


def traced(trace: Path, kind: str = "caption") -> list[dict]:
    """The model calls ("caption") or the inputs prepare tasks started ("prepare"), oldest first."""
    events = [json.loads(line) for path in trace.glob("*.jsonl") for line in path.read_text().splitlines()]
    return sorted((e for e in events if e["kind"] == kind), key=lambda e: e["t"])


def physical_rows(output: Path) -> list[dict]:
    return pq.read_table(output, schema=OUTPUT_SCHEMA).to_pylist()  # every row of every part (no dedupe)


def leftovers(folder: Path) -> list[str]:
    """What is left in a TMPDIR, except torch's own empty cache folder: importing torch._dynamo (which
    transformers does) creates an empty `torchinductor_<user>` in TMPDIR; it is torch's, not avsieve's."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder)
        if path.is_dir() and name.parts[0].startswith("torchinductor_"):
            continue
        found.append(str(name))
    return found


# ---- tests ---------------------------------------------------------------------------------------------


# Seconds to wait for a caption actor to get its first batch, and for the job to end, by engine: a vLLM
# actor starts an engine (the poison test starts two, one per actor incarnation), which takes longer than
# the HF actor's model load (whole test: 60 s with vllm, 43 s with hf, on 2 cores shared with other jobs).
ACTOR_READY_S = {"hf": 120, "vllm": 300}
JOB_END_S = {"hf": 90, "vllm": 300}


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_poison_window_restarts_on_another_node_and_leaves_no_temporary_files(sim, clips, tmp_path, engine):
    """The poison window kills its caption actor every time. The actor's node gets a preemption notice
    while the window is in flight there, so Ray restarts the actor on the other worker: only the crash
    journal in the output folder tells the new incarnation what killed the old one. The window becomes
    one `crash` row, the rest are captioned, and no node's (nor the driver's) TMPDIR keeps anything of
    the job. The same with each engine: the vLLM engine runs inside the actor's process (its death is the
    actor's) and starts again, with its rendezvous file, in the restarted actor."""
    if engine == "vllm":
        vllm_or_skip()
    folder = input_folder(clips, tmp_path / "in", ["c0.mp4", "c1.mp4", "c2.mp4", "c3.mp4", "poison.mp4"])
    output, gate, trace = tmp_path / "out", tmp_path / "gate", tmp_path / "trace"
    trace.mkdir()
    # One batch holds all five windows, so the poison window is in the first batch the actor gets. The
    # gate holds that batch until the actor's node is drained: Ray Data sends no new batches to actors on
    # a draining node, but the one in flight goes on and dies there.
    driver = Driver(sim, folder, output, tmp_path / "tmp-driver", "--batch-size", "8", engine=engine,
                    poison="poison.mp4", gate=gate, trace=trace)
    try:
        wait_for(lambda: Path(f"{gate}.waiting").exists(), "a batch at the caption actor", driver=driver,
                 timeout=ACTOR_READY_S[engine])
        (actor,) = sim.caption_actors()
        first_node = actor["node"]
        sim.drain(first_node)  # new work, the restarted actor included, goes elsewhere
        gate.touch()
        summary = driver.wait(timeout=JOB_END_S[engine])
    finally:
        driver.kill()
    poison_id = next(r["clip_id"] for r in physical_rows(output) if r["uri"].endswith("poison.mp4"))
    calls = [c for c in traced(trace) if poison_id in c["clip_ids"]]
    assert len(calls) == 2, calls  # in the batch on the first node, then alone on the other: no third try
    assert calls[0]["node"] == first_node and len(calls[0]["clip_ids"]) == 5
    assert calls[1]["node"] not in (first_node, "head") and calls[1]["clip_ids"] == [poison_id]

    rows = {Path(r["uri"]).name: r for r in read_output(str(output)).to_pylist()}
    assert summary["engine"] == engine and {r["engine"] for r in rows.values()} == {engine}
    assert summary["windows"] == 5 and summary["ok"] == 4 and summary["errors_by_kind"] == {"crash": 1}
    assert (rows["poison.mp4"]["status"], rows["poison.mp4"]["error_kind"]) == ("error", "crash")
    assert "died 2 times" in rows["poison.mp4"]["error"]
    assert len(physical_rows(output)) == 5  # one row per window
    assert not (output / "_avsieve" / "journal" / summary["run_id"]).exists()  # removed when the run ended
    for name, folder in [("driver", driver.tmpdir), *sim.tmpdirs.items()]:
        assert leftovers(folder) == [], f"{name} TMPDIR keeps {leftovers(folder)}"

    sim.remove(first_node)  # the preempted node goes away; the worker group starts a replacement
    sim.add_worker()


PREPARE_SLEEP_S = 1.0  # per input: the third prepare task (two workers, one CPU each) runs while the first
# windows are captioned


def test_a_worker_lost_mid_job_is_replaced_and_every_window_is_written_once(sim, clips, tmp_path):
    """A worker is removed (its raylet and workers SIGKILLed, as when a spot VM is reclaimed) while its
    caption actor is busy and one of its prepare tasks runs; the worker group's replacement joins. Ray
    restarts the actor on the new node, retries its batches and recomputes the lost prepare task and the
    blocks that lived in the lost node's object store. The job ends with exactly one row per window."""
    folder = input_folder(clips, tmp_path / "in", ELEVEN_AND_LONG)
    output, trace = tmp_path / "out", tmp_path / "trace"
    trace.mkdir()
    driver = Driver(sim, folder, output, tmp_path / "tmp-driver", "--actors", "2", "--batch-size", "1",
                    sleep_s=1, prepare_sleep_s=PREPARE_SLEEP_S, trace=trace)

    def busy_worker() -> str | None:
        """A worker with a live caption actor that is inside a prepare task right now, once the job has
        captioned its first window (an input whose prepare started < PREPARE_SLEEP_S ago is still going)."""
        if not traced(trace):
            return None
        now = time.time()
        preparing = {e["node"] for e in traced(trace, "prepare") if now - e["t"] < PREPARE_SLEEP_S - 0.3}
        return next(iter(sorted(preparing & {a["node"] for a in sim.caption_actors()})), None)

    try:
        victim = wait_for(busy_worker, "a worker that captions and prepares", driver=driver, interval=0.1)
        removed_at = time.time()
        captioned_before = {i for c in traced(trace) for i in c["clip_ids"]}
        sim.remove(victim)
        sim.add_worker()
        summary = driver.wait()
    finally:
        driver.kill()
    assert summary["windows"] == summary["ok"] == 14 and summary["error"] == 0
    physical = physical_rows(output)
    assert len(physical) == len({r["clip_id"] for r in physical}) == 14  # none lost, none duplicated
    calls = traced(trace)
    counts = Counter(i for c in calls for i in c["clip_ids"])
    assert set(counts) == {r["clip_id"] for r in physical}
    print(f"\nnode lost: windows captioned before the loss {len(captioned_before)}, recomputed "
          f"{sum(n - 1 for n in counts.values())} of 14; the job ended {time.time() - removed_at:.1f} s after the "
          f"loss, {driver.seconds:.1f} s in all")


def test_driver_killed_then_rerun_on_the_same_cluster(sim, clips, tmp_path):
    """After the node loss: the driver is SIGKILLed mid-job (Ray ends its job's actors and tasks); the same
    command again writes only the missing windows, each once."""
    folder = input_folder(clips, tmp_path / "in", [f"c{i}.mp4" for i in range(6)])
    output = tmp_path / "out"
    driver = Driver(sim, folder, output, tmp_path / "tmp-driver", "--batch-size", "1", sleep_s=0.5)
    try:
        wait_for(lambda: list(output.glob("part-*.parquet")), "a first part", driver=driver)
    finally:
        driver.kill()
    done_before = len(physical_rows(output))
    assert 1 <= done_before < 6
    wait_for(lambda: not sim.caption_actors(), "the killed job's actors to go", timeout=60)
    rerun = Driver(sim, folder, output, tmp_path / "tmp-rerun")
    summary = rerun.wait()
    assert summary["run"]["windows"] == 6 - done_before and summary["skipped"]["windows"] == done_before
    assert summary["windows"] == summary["ok"] == 6
    physical = physical_rows(output)
    assert len(physical) == len({r["clip_id"] for r in physical}) == 6  # none lost, none duplicated
    assert read_output(str(output)).num_rows == 6
    print(f"\ndriver killed: {done_before} of 6 windows written before the kill; the rerun captioned "
          f"{summary['run']['windows']} and skipped {summary['skipped']['windows']} in {rerun.seconds:.1f} s")
