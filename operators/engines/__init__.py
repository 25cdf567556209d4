"""Caption engines behind one interface: `make_engine(settings)` -> an object with

- `label`: what goes into the `model` column,
- `retention`: the compute budget the rows record as `retention_target`,
- `caption(blobs) -> list[dict]`: one result per prepared window blob (`model_inputs`), in order; raises
  when the batch fails (the caption stage then retries window by window).

`hf` is avsieve's decoder loop over transformers' layers (all pruning methods, beam search, training);
`vllm` is a vLLM engine (continuous batching, paged KV cache) with transformers' positions. Which one a
run uses is resolved once, in the driver (`resolve_engine`), and is part of its configuration hash.
"""

from __future__ import annotations

ENGINES = ("hf", "vllm")


def resolve_engine(requested: str, unsupported: list[str], gpu: bool) -> str:
    """The engine a run uses: `auto` is vllm where vLLM is installed, a GPU is there and the settings need
    nothing only the HF engine has; hf otherwise. An explicit vllm with such settings is an error."""
    from operators.engines.vllm import vllm_available

    if requested == "auto":
        return "vllm" if gpu and not unsupported and vllm_available() else "hf"
    if requested == "vllm":
        if unsupported:
            raise ValueError("--engine vllm cannot run " + "; ".join(unsupported) + ": use --engine hf")
        if not vllm_available():
            raise ValueError("--engine vllm needs vLLM in this environment: `bash scripts/setup.sh vllm` makes "
                             ".venv-vllm (or use --engine hf)")
    elif requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}: choose hf, vllm or auto")
    return requested


def window_form(engine: str, pruner: str) -> str:
    """How prepared windows travel to this engine's actors: the unpruned vLLM engine runs vLLM's own
    processor on decoded frames and samples ("compact", about a third of the bytes); every other run
    gets the HF processor's tensors ("tensors"), which the pruned vLLM engine passes to vLLM as they are,
    so that both engines plan and keep from identical inputs."""
    return "compact" if engine == "vllm" and pruner == "none" else "tensors"


def make_engine(settings):
    if settings.engine == "vllm":
        from operators.engines.vllm import VllmCaptioner

        return VllmCaptioner(settings)
    from operators.engines.hf import HfCaptioner

    return HfCaptioner(settings)
