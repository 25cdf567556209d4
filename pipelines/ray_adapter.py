"""Every Ray-specific knob of the caption job lives here: cluster connection, DataContext, resources,
actor pools and the write step. Operators stay plain Python and never import ray."""

from __future__ import annotations

import logging

import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.datasource import Datasink

from operators.caption import CaptionActor, CaptionSettings
from operators.prepare import PrepareSettings, prepare_windows
from operators.sink import write_part

log = logging.getLogger(__name__)


class CaptionParquetDatasink(Datasink):
    """Ray's write step for caption rows: one content-addressed, atomically renamed Parquet file per
    block (operators.sink.write_part), so reruns reproduce file names and kills leave no partial parts."""

    def __init__(self, output: str):
        self.output = output

    def write(self, blocks, ctx) -> list[str]:
        return [write_part(block, self.output) for block in blocks if block.num_rows]


def connect(address: str | None) -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS / --ray-address, or start a local one."""
    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)


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
    ds = ray.data.read_parquet(manifest_path)
    ds = ds.flat_map(prepare_windows, fn_kwargs={"settings": prepare}, num_cpus=prepare_cpus)
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"settings": caption},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=actors, max_size=max_actors or actors,
                                  max_tasks_in_flight_per_actor=2),
        num_gpus=gpus,
        num_cpus=cpus_per_actor,
    )
    ds.write_datasink(CaptionParquetDatasink(output))
