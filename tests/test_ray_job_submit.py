"""The job as users submit it: `ray job submit --runtime-env ray_job.yaml -- python -m pipelines.caption ...`
against a real head node started with the venv's `ray` binary; plus static checks of the deployment files.

Teardown kills exactly the process tree of the head node this test started (SIGTERM, then SIGKILL).
`ray stop --force` is not used on purpose: it kills every Ray process of the user on the machine,
including the session's shared test cluster and other people's clusters.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from operators.schema import OUTPUT_SCHEMA
from pipelines.config import load_config

from conftest import REAL_CLIPS, REAL_CLIPS_DIR, REPO_ROOT, free_port
from operators.models.qwen2_5_omni import model_label, resolve_model_source

RAY = Path(sys.executable).with_name("ray")
UPLOAD_LIMIT = 100 * 1024 * 1024


# ---- process helpers ---------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants_by_depth(pid: int) -> list[list[int]]:
    """[[children], [grandchildren], ...] of pid."""
    tree, levels, level = _children(), [], [pid]
    while True:
        level = [child for parent in level for child in tree.get(parent, [])]
        if not level:
            return levels
        levels.append(level)


def _with_marker(marker: str) -> list[int]:
    """Processes whose command line names this test's private temp dir (only ours can)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pids: list[int], grace: float) -> None:
    _signal_all(pids, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    _signal_all([p for p in pids if _alive(p)], signal.SIGKILL)


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Deepest processes first, so every parent is still there to reap its children (no zombies)."""
    levels = _descendants_by_depth(proc.pid)
    known = {p for level in levels for p in level} | {proc.pid}
    strays = [p for p in _with_marker(temp_dir) if p not in known]  # reparented earlier, still ours
    _stop(strays, 5)
    for level in reversed(levels):
        _stop(level, 5)
        time.sleep(1)  # let the parents reap
    _stop([proc.pid], 5)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    _stop([p for p in _with_marker(temp_dir) if _alive(p)], 2)


# ---- the head node -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_node():
    """A fresh single-node cluster (2 CPUs, dashboard + job server) on free ports, with token auth."""
    temp_dir = tempfile.mkdtemp(prefix="avr-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [str(RAY), "start", "--head", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block",
           *(f"{flag}={port}" for flag, port in ports.items())]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            probe = subprocess.run([str(RAY), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("ray head did not come up:\n" + (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
                            + probe.stderr[-2000:])
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        stop_head(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_with_runtime_env(head_node, tmp_path):
    output = tmp_path / "out"
    cmd = [str(RAY), "job", "submit", "--address", head_node["address"], "--runtime-env", "ray_job.yaml",
           "--", "python", "-m", "pipelines.caption", "--input", str(REAL_CLIPS_DIR), "--output", str(output),
           "--window-s", "4", "--max-new-tokens", "4", "--progress", "false"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=head_node["env"], capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-5000:]
    table = pq.read_table(output, schema=OUTPUT_SCHEMA)  # _avsieve/ bookkeeping is skipped
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [Path(r["uri"]).name for r in rows] == sorted(REAL_CLIPS)  # one window each (all <= 4 s)
    assert [r["status"] for r in rows] == ["ok"] * 3, [r["error"] for r in rows]
    assert all(r["model"] == model_label(resolve_model_source(None)) for r in rows)
    assert '"windows": 3' in log  # the driver's summary line reached the job log


# ---- deployment files (fast, no cluster) --------------------------------------------------------------


def test_ray_job_yaml_uploads_code_and_embedded_model_only():
    from ray._private.runtime_env import packaging

    env = yaml.safe_load((REPO_ROOT / "ray_job.yaml").read_text())
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "conda", "config"}
    assert env["working_dir"] == "."
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env["env_vars"].items())
    files: list[Path] = []
    packaging._dir_travel(REPO_ROOT, [packaging._get_excludes(REPO_ROOT, env["excludes"])], files.append,
                          include_gitignore=True)
    names = {p.relative_to(REPO_ROOT).as_posix() for p in files if p.is_file()}
    assert {"operators/models/embedded/model.safetensors", "operators/models/embedded/config.json",
            "pipelines/caption.py", "operators/prepare.py"} <= names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "tests/")) or n.endswith(".pyc")]
    size = sum(p.stat().st_size for p in files if p.is_file())
    assert size < UPLOAD_LIMIT, f"working_dir upload would be {size / 2**20:.0f} MiB"


def _entrypoint_args(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "pipelines.caption"]
    return words[3:]


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((REPO_ROOT / "cluster" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) > 0
    config = load_config(_entrypoint_args(spec["entrypoint"]))  # every flag must exist
    assert config.model == "Qwen/Qwen2.5-Omni-7B" and config.dtype == "bfloat16"
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    assert config.gpus_per_actor == 1
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {})
    (gpu,) = [g for g in cluster["workerGroupSpecs"]
              if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert 0 <= gpu["minReplicas"] < gpu["maxReplicas"]


def test_cluster_launcher_config():
    doc = yaml.safe_load((REPO_ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    assert doc["provider"]["type"] == "aws"
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert not head["resources"].get("GPU")
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("g5.", "g6.")) for t in gpu_types.values())
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"] for t in gpu_types.values())
    assert any("pip install" in c and "." in c for c in doc["setup_commands"])


def test_cluster_readme_commands_use_real_flags():
    """Every `python -m pipelines.caption ...` line of cluster/README.md parses with the job's own parser."""
    text = (REPO_ROOT / "cluster" / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("python -m pipelines.caption", 1)[1] for line in text.splitlines()
                if "python -m pipelines.caption" in line]
    assert any("Qwen/Qwen2.5-Omni-7B" in c and "--gpus-per-actor" in c for c in commands)
    for command in commands:
        args = shlex.split(command.split("`")[0])
        load_config(args)


def test_dockerfile_installs_the_project():
    text = (REPO_ROOT / "cluster" / "Dockerfile").read_text()
    assert "FROM " in text and 'pip install --no-cache-dir ".[s3,gcs]"' in text
    assert "rayproject/ray:2.60.0" in text
