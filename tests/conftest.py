"""Shared fixtures: generated clips, the embedded model's settings, one local Ray cluster per session.

The machine has 2 cores: every in-process job test shares the single `ray_cluster` started here, and
it is always shut down at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
REAL_CLIPS_DIR = TESTS_DIR / "data" / "clips"
# (file, duration in seconds) of the real clips shipped with the tests (see data/clips/references.json)
REAL_CLIPS = {
    "bbb_bird_0016-0020.mp4": 4.0,
    "bbb_revenge_0281.5-0284.7.mp4": 3.209,
    "mdn_stream-of-water.mp4": 3.158,
}

if str(TESTS_DIR) not in sys.path:  # `import media` from any test module
    sys.path.insert(0, str(TESTS_DIR))

import media  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The moto S3 server of test_remote_inputs listens here. Ray workers only see environment variables
# that exist when the cluster starts, so the endpoint is fixed now and handed to the cluster below. The
# port stays bound by this socket until the server starts: otherwise one of Ray's own processes can take
# it in between (seen: a Ray Data stats actor listening on it, and moto's start hanging).
_S3_PORT_HOLDER = socket.socket()
_S3_PORT_HOLDER.bind(("127.0.0.1", 0))
S3_PORT = _S3_PORT_HOLDER.getsockname()[1]


def release_s3_port() -> None:
    """Call right before the moto server binds S3_PORT."""
    _S3_PORT_HOLDER.close()
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Honoured by botocore/s3fs and by pyarrow's S3 filesystem (used by Ray Data's reader and writer).
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
}


@pytest.fixture(scope="session")
def model_source() -> str:
    from operators.models.qwen2_5_omni import resolve_model_source

    return resolve_model_source("embedded")


@pytest.fixture(scope="session")
def clip_set(tmp_path_factory) -> dict[str, Path]:
    """The generated clips of tests/media.py (name -> path), written once per session."""
    return media.make_clip_set(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def corrupt_payload_clip(clip_set, tmp_path_factory) -> Path:
    """A file whose container opens fine but whose video packets are garbage."""
    return media.write_corrupt_payload(clip_set["av"], tmp_path_factory.mktemp("corrupt") / "corrupt.mp4")


@pytest.fixture(scope="session")
def real_clips(tmp_path_factory) -> Path:
    """A private copy of tests/data/clips (only the media files)."""
    folder = tmp_path_factory.mktemp("real")
    for name in REAL_CLIPS:
        shutil.copy(REAL_CLIPS_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def prepare_settings(model_source):
    from operators.prepare import PrepareSettings

    card = {"max_pixels": 168 * 168, "min_pixels": 56 * 56}  # the embedded model's recommended sizes
    return PrepareSettings(model=model_source, prompt="Describe the clip.", window_s=4.0, **card)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every in-process job test of the session."""
    import ray

    if ray.is_initialized():  # pragma: no cover - a test leaked a cluster
        ray.shutdown()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix="avt-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": dict(S3_ENV)}, _temp_dir=temp_dir)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_config(input_uri: str, output_uri: str, **overrides):
    """A CaptionConfig sized for the tests: short windows, 4 new tokens, no progress bars."""
    from pipelines.config import CaptionConfig

    values = dict(input=input_uri, output=output_uri, window_s=4.0, max_new_tokens=4, batch_size=4,
                  progress=False)
    values.update(overrides)
    return CaptionConfig(**values)


def vllm_or_skip():
    """Skip a vLLM test where vLLM is not installed (the main .venv); fail instead where the run says vLLM
    must be there (.ci/run sets AVSIEVE_REQUIRE_VLLM=1 for .venv-vllm), so a broken vLLM environment can
    never pass as skipped tests."""
    from operators.engines.vllm import vllm_available

    if not vllm_available():
        if os.environ.get("AVSIEVE_REQUIRE_VLLM") == "1":
            pytest.fail("AVSIEVE_REQUIRE_VLLM=1 but vLLM does not import in this environment")
        pytest.skip("vLLM is not installed here: bash scripts/setup.sh vllm, then run with .venv-vllm")


def float32_vllm(model: str, max_model_len: int | None = 4096, engine_args: dict | None = None, **settings):
    """A vLLM engine as the exactness tests run one: CPU, float32, greedy, 24 new tokens, a 4,096-token
    context unless said otherwise; `settings` adds caption settings (a pruner, its retention)."""
    vllm_or_skip()
    from operators.caption import CaptionSettings
    from operators.engines.vllm import VllmCaptioner

    return VllmCaptioner(CaptionSettings(model=model, device="cpu", dtype="float32", max_new_tokens=24, engine="vllm",
                                         **settings), max_model_len=max_model_len, engine_args=engine_args)


def float32_hf(model: str):
    """The HF engine with float32_vllm's settings, the reference it is held to."""
    from operators.caption import CaptionSettings
    from operators.engines.hf import HfCaptioner

    return HfCaptioner(CaptionSettings(model=model, device="cpu", dtype="float32", max_new_tokens=24))


@pytest.fixture(scope="session")
def vllm_captioner(model_source):
    """One vLLM engine (float32_vllm) for every vLLM test of the session."""
    return float32_vllm(model_source)


@pytest.fixture(scope="session")
def hf_captioner(model_source):
    return float32_hf(model_source)
