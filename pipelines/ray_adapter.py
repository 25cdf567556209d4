"""Every Ray-specific knob of the caption job lives here: cluster connection, DataContext, resources,
actor pools and the write step. Operators stay plain Python and never import ray."""

from __future__ import annotations

import logging
import os
import posixpath

import fsspec

import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.datasource import Datasink

from operators import faults
from operators.caption import CaptionActor, CaptionSettings
from operators.prepare import PrepareSettings, prepare_windows
from operators.sink import write_part

log = logging.getLogger(__name__)

SOURCES_PER_PREPARE_TASK = 4  # inputs decoded per CPU task: parallelism and commit granularity


class CaptionParquetDatasink(Datasink):
    """Ray's write step for caption rows: one content-addressed, atomically renamed Parquet file per
    block (operators.sink.write_part), so reruns reproduce file names and kills leave no partial parts."""

    def __init__(self, output: str):
        self.output = output

    def write(self, blocks, ctx) -> list[str]:
        return [write_part(block, self.output) for block in blocks if block.num_rows]


def journal_dir(output: str, run_id: str) -> str:
    """Where a run's caption actors keep their crash journals: beside the output, which every node reads
    (a node's temp folder is not there when Ray restarts the actor on another node)."""
    return posixpath.join(output.rstrip("/"), "_avsieve", "journal", run_id)


class JournaledCaptionActor(CaptionActor):
    """CaptionActor with a crash journal keyed by its Ray actor id, which survives actor restarts: the
    restarted process learns which windows were in flight when its predecessor died."""

    def __init__(self, settings: CaptionSettings, journals: str):
        actor_id = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
        super().__init__(settings, journal_path=posixpath.join(journals, f"{actor_id}.json"))


def remove_journals(output: str, run_id: str) -> None:
    """The run's journals, once it has ended (its windows are written, as rows or error rows)."""
    fs, path = fsspec.core.url_to_fs(journal_dir(output, run_id))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def connect(address: str | None) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS / --ray-address, or start a local one."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)


def calibration_signals(rows: list[dict], prepare: PrepareSettings, windows: int, cpus: float) -> list:
    """Content signals of whole inputs, taken in the order given until at least `windows` windows are in
    (the sample the adaptive budget is calibrated on), each input prepared in its own Ray task."""
    from pipelines.caption import window_signals

    task = ray.remote(num_cpus=cpus, max_retries=2)(window_signals)
    refs = [task.remote(row, prepare) for row in rows[:windows]]  # every input has at least one window
    signals = []
    for i, ref in enumerate(refs):
        signals.extend(ray.get(ref))
        if len(signals) >= windows:
            for rest in refs[i + 1:]:
                ray.cancel(rest)
            break
    return signals


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def configure_context(progress: bool) -> None:
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0  # operators turn bad inputs into rows; a failing block is a real bug
    ctx.execution_options.preserve_order = False


def run_caption_job(manifest_path: str, output: str, prepare: PrepareSettings, caption: CaptionSettings,
                    *, batch_size: int, actors: int, max_actors: int | None, gpus_per_actor: float | None,
                    cpus_per_actor: float, prepare_cpus: float, progress: bool) -> None:
    configure_context(progress)
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if cluster_has_gpus() else 0.0)
    # Fault-injection tests only: workers do not see the driver's environment, so AVSIEVE_FAULT_*
    # variables travel in a runtime_env (merged with the job's) of the operators that read them
    # (prepare, caption and write). Empty in real runs.
    env = faults.forwarded_env()
    extra = {"runtime_env": {"env_vars": env}} if env else {}
    ds = ray.data.read_parquet(manifest_path)
    # Small prepare tasks: a manifest file is one read task, and without this one task would decode the
    # whole corpus and every caption would be committed in one part at its very end (a kill loses all).
    ds = ds.repartition(target_num_rows_per_block=SOURCES_PER_PREPARE_TASK)
    ds = ds.flat_map(prepare_windows, fn_kwargs={"settings": prepare}, num_cpus=prepare_cpus, **extra)
    ds = ds.map_batches(
        JournaledCaptionActor,
        fn_constructor_kwargs={"settings": caption, "journals": journal_dir(output, caption.run_id)},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=actors, max_size=max_actors or actors,
                                  max_tasks_in_flight_per_actor=2),
        num_gpus=gpus,
        num_cpus=cpus_per_actor,
        # A dead actor (OOM kill, crash) is restarted and its batch retried. The journal makes each death
        # mark at least one window (alone, then as an error row), so batch_size + 1 deaths always suffice;
        # a finite bound keeps an unrelated crash loop from retrying forever.
        max_restarts=-1,
        max_task_retries=batch_size + 2,
        **extra,
    )
    ds.write_datasink(CaptionParquetDatasink(output), ray_remote_args=extra or None)
