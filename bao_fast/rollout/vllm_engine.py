"""vLLM rollout engine colocated with training (one engine per ``torchrun`` rank).

::

    engine = VLLMEngine.from_config(model_path, cfg.rollout, seed=cfg.seed)  # every rank, same args
    engine.wake_up(tags=["weights"])   # GPU: weights back first, KV cache after the sync (lower peak)
    engine.sync_weights_from(policy)   # FSDP2 policy: all ranks gather full tensors, push, reset caches
    engine.wake_up(tags=["kv_cache"])
    gens = engine.generate(prompts, GenerationParams(...))
    engine.sleep()                     # before the backward passes

* In a ``torchrun``-launched process (``RANK``/``LOCAL_RANK`` set) the engine uses vLLM's
  ``external_launcher`` executor: it lives in this process and joins the ranks ``torchrun`` started
  (``tensor_parallel_size`` consecutive ranks share one model replica and must submit the same prompts
  and params in the same order, see ``bao_fast.rollout.tp_group``; with 1, every rank plays its own episodes).
  On the CPU with ``tensor_parallel_size`` > 1 the ranks first clear the shared-memory files a killed run
  left (``bao_fast.rollout.cpu_shm``), which would otherwise fail vLLM's start-up. Without ``torchrun``
  the engine runs single-process (``uni``), with ``tensor_parallel_size`` 1 only. Weight sync is the same
  for every ``tensor_parallel_size``: each rank pushes the full tensors and vLLM's loaders keep its shard.
  Either way the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is what lets
  ``load_weights`` hand vLLM a lazy iterator instead of serialising tensors.
* Memory: on a GPU the KV cache gets ``cfg.gpu_memory_utilization`` of the device and sleep mode is
  enabled (``cfg.sleep_level`` 1 offloads weights to host memory, 2 discards them: after a level-2
  ``wake_up`` the weights must be pushed with ``load_weights``/``sync_weights_from`` before ``generate``,
  which raises otherwise). On the CPU the KV cache is ``cfg.cpu_kv_cache_gib`` GiB (vLLM lets the
  legacy ``VLLM_CPU_KVCACHE_SPACE`` variable override it), ``sleep`` and ``wake_up`` are no-ops, and the
  model always runs eagerly.
* Weight sync pushes every tensor in **one** ``reload_weights`` call fed by a bucketed generator
  (``bao_fast.rollout.weight_sync``): vLLM reloads layer by layer and fuses q/k/v and gate/up, so a layer
  split across two reload calls would be re-initialised half-empty. The prefix cache is reset after.
  A tied LM head (``tie_word_embeddings``: the head shares the embedding's parameter, which alone is pushed)
  gets no weights of its own in that reload, so vLLM never re-processes it: on the CPU it would keep
  computing logits from the weight it packed at start-up. ``load_weights`` re-processes such heads.
* Log-probs are vLLM's ``processed_logprobs`` (after temperature / top-p), i.e. the sampling
  distribution, matching ``bao_fast.ops.token_logprobs(..., temperature=T)`` of the same weights.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bao_fast.config import RolloutConfig
from bao_fast.rollout.cpu_shm import cpu_shm_in_use, remove_stale_cpu_shm
from bao_fast.rollout.engine import DTYPES, Generation, GenerationParams, check_context_length, validate_prompts
from bao_fast.rollout.tp_group import check_tp_size
from bao_fast.rollout.weight_sync import iter_full_weights

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadFilter(logging.Filter):
    """Drops vLLM's ``<...>RotaryEmbedding: Failed to load weights`` warning, which every ``reload_weights``
    logs: rotary layers hold only a cos/sin cache computed at construction (never part of a checkpoint), which
    vLLM puts back unchanged. The same warning for any other layer still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == "%s: Failed to load weights" and args and str(args[0]).endswith("RotaryEmbedding")
        )


def quiet_rotary_reload_warning() -> None:
    """Install ``RotaryReloadFilter`` on vLLM's layer-wise reload logger (once per process)."""
    logger = logging.getLogger(_RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(RotaryReloadFilter())


def clear_stale_cpu_shm() -> None:
    """Every rank deletes the communicator files a killed CPU tensor-parallel run left
    (``bao_fast.rollout.cpu_shm``), then waits for the others, so that no rank creates its own file while
    another is still clearing."""
    for path in remove_stale_cpu_shm():
        print(f"removed stale vLLM-cpu shared memory {path} (no live process maps it)", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()


def reprocess_tied_embeddings(worker: Any) -> int:
    """Re-run weight post-processing on every unquantized (vocab) embedding layer whose weight is shared with
    another one, i.e. the LM head tied to the input embedding; returns the number of such layers.

    vLLM-CPU packs a copy of the LM-head weight for its GEMM when the head is processed; a layer-wise reload
    processes only the layers it loads weights into, and a tied head is never loaded (its checkpoint name is
    skipped), so without this its logits keep using the start-up weight. Off the CPU the processing does
    nothing (the GPU head reads the shared weight), so it is run everywhere.
    Runs on the engine's worker (``collective_rpc``).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    sharing: dict[int, list[nn.Module]] = {}
    for module in worker.get_model().modules():
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            sharing.setdefault(id(module.weight), []).append(module)
    tied = [module for group in sharing.values() if len(group) > 1 for module in group]
    for module in tied:
        module.quant_method.process_weights_after_loading(module)
    return len(tied)


class VLLMEngine:
    """``GenerationEngine`` over an in-process ``vllm.LLM``; build it with ``from_config``."""

    def __init__(
        self,
        llm: Any,
        *,
        max_model_len: int,
        dtype: torch.dtype,
        sleep_level: int = 1,
        on_gpu: bool = False,
        bucket_mb: float = 512,
        tensor_parallel_size: int = 1,
    ):
        self.llm = llm
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.sleep_level = sleep_level
        self.on_gpu = on_gpu
        self.bucket_mb = bucket_mb
        self._asleep = False
        self._weights_stale = False
        self._unfinished: dict[str, tuple[int, bool]] = {}  # vLLM request id -> (add_request's key, log-probs?)
        self.tensor_parallel_size = tensor_parallel_size

    @classmethod
    def from_config(
        cls, model_path: str | Path, cfg: RolloutConfig, seed: int = 0, *, dtype: str | None = None
    ) -> VLLMEngine:
        """Create the engine for the HF checkpoint at ``model_path``.

        ``dtype`` (float32 | bfloat16 | float16) defaults to bfloat16 on a GPU and float32 on the CPU.
        All ranks of a ``torchrun`` job must call this with the same arguments.
        """
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path {str(model_path)!r} is not a checkpoint directory")
        if cfg.sleep_level not in (1, 2):
            raise ValueError(f"rollout.sleep_level must be 1 or 2, got {cfg.sleep_level}")
        check_context_length(model_path, cfg.max_model_len)
        on_gpu = torch.cuda.is_available()
        dtype = dtype or ("bfloat16" if on_gpu else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        launched = "RANK" in os.environ and "LOCAL_RANK" in os.environ  # torchrun (or compatible) launch
        world = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
        check_tp_size(cfg.tensor_parallel_size, world)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "dtype": dtype,
            "seed": seed,
            "max_model_len": cfg.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "distributed_executor_backend": "external_launcher" if launched else "uni",
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": True,
        }
        if on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enable_sleep_mode=True,
                enforce_eager=cfg.enforce_eager,
            )
        else:
            kwargs.update(kv_cache_memory_bytes=int(cfg.cpu_kv_cache_gib * 2**30), enforce_eager=True)
        cpu_tp = launched and not on_gpu and cfg.tensor_parallel_size > 1
        if cpu_tp:
            clear_stale_cpu_shm()
        try:
            llm = LLM(**kwargs)
        except RuntimeError as exc:
            if cpu_tp and "SHMManager" in str(exc):
                held = ", ".join(f"{path} (pid {pid})" for path, pid in cpu_shm_in_use().items()) or "none found"
                raise RuntimeError(
                    f"vLLM-cpu could not create its tensor-parallel shared memory ({exc}). It names those files after "
                    f"the group's ranks only, so two CPU tensor-parallel runs cannot share a machine; in use: {held}"
                ) from exc
            raise
        quiet_rotary_reload_warning()
        return cls(
            llm,
            max_model_len=cfg.max_model_len,
            dtype=DTYPES[dtype],
            sleep_level=cfg.sleep_level,
            on_gpu=on_gpu,
            bucket_mb=cfg.weight_sync_bucket_mb,
            tensor_parallel_size=cfg.tensor_parallel_size,
        )

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Generation]:
        """One continuation per prompt (see ``bao_fast.rollout.engine`` for the contract)."""
        self._check_ready("generate")
        if self._unfinished:  # LLM.generate would run them too and not return them
            raise RuntimeError("VLLMEngine.generate called with add_request requests unfinished; step them to the "
                               "end or abort_requests() first")
        validate_prompts(prompts, self.max_model_len)
        seeds = [None if params.seed is None else params.seed + i for i in range(len(prompts))]
        sampling = [self._sampling(params, len(prompt), seed) for prompt, seed in zip(prompts, seeds, strict=True)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        return [self._generation(out, params.return_logprobs) for out in outputs]

    def add_request(self, key: int, prompt: list[int], params: GenerationParams) -> None:
        """Queue one continuation of ``prompt`` (seeded with ``params.seed`` as is); ``step`` reports it. The
        ranks of a tensor-parallel engine must add the same requests in the same order."""
        self._check_ready("add_request")
        validate_prompts([prompt], self.max_model_len)
        request_id = f"bao-{key}"
        if request_id in self._unfinished:
            raise ValueError(f"key {key} is already queued and unfinished")
        sampling = self._sampling(params, len(prompt), params.seed)
        # a rendered token input (what LLM.generate hands the engine after its renderer)
        self.llm.llm_engine.add_request(request_id, {"type": "token", "prompt_token_ids": list(prompt)}, sampling)
        self._unfinished[request_id] = (key, params.return_logprobs)

    def step(self) -> list[tuple[int, Generation]]:
        """One engine step (a scheduled batch of prefill and decode work); the requests that finished in it."""
        done = []
        for out in self.llm.llm_engine.step():
            if out.finished:
                key, return_logprobs = self._unfinished.pop(out.request_id)
                done.append((key, self._generation(out, return_logprobs)))
        return done

    def has_unfinished_requests(self) -> bool:
        """Whether a request from ``add_request`` has not been reported by ``step`` yet."""
        return bool(self._unfinished)

    def abort_requests(self) -> None:
        """Drop every unfinished ``add_request`` request."""
        if self._unfinished:
            self.llm.llm_engine.abort_request(list(self._unfinished))
            self._unfinished.clear()

    def _check_ready(self, caller: str) -> None:
        if self._asleep:
            raise RuntimeError(f"VLLMEngine.{caller} called while asleep; call wake_up() first")
        if self._weights_stale:
            raise RuntimeError("weights were discarded by a level-2 sleep; push them with sync_weights_from() first")

    def _sampling(self, params: GenerationParams, prompt_len: int, seed: int | None) -> Any:
        """vLLM ``SamplingParams`` of one request (final output only, token ids without text)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=min(params.max_tokens, self.max_model_len - prompt_len),
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0 if params.return_logprobs else None,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _generation(out: Any, return_logprobs: bool) -> Generation:
        """A finished vLLM ``RequestOutput`` as a ``Generation``."""
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = None
        if return_logprobs:
            logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids)]
        finish = "stop" if completion.finish_reason == "stop" else "length"
        return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)

    def sleep(self) -> None:
        """Free GPU memory (level ``sleep_level``); a no-op on the CPU."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore GPU memory: ``tags`` None (all), ``["weights"]`` or ``["kv_cache"]``; no-op on the CPU."""
        if not (self.on_gpu and self._asleep):
            return
        awake = self.llm.wake_up(tags)
        if tags is None or "weights" in tags:
            self._weights_stale = self.sleep_level == 2
        self._asleep = not awake

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy HF-named full tensors into the engine in one ``reload_weights`` call, re-process tied LM heads
        (``reprocess_tied_embeddings``), reset the prefix cache.

        ``named_tensors`` may be lazy; it is consumed exactly once, in order.
        """
        weights: Iterator[tuple[str, Tensor]] = iter(named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.collective_rpc(reprocess_tied_embeddings)  # a no-op where the head reads the shared weight
        self.llm.reset_prefix_cache()
        self._weights_stale = False

    def shutdown(self) -> None:
        """Free the engine. vLLM's teardown also destroys the default ``torch.distributed`` process group,
        so under ``torchrun`` call this last, in place of ``destroy_process_group``."""
        self.llm.llm_engine.engine_core.shutdown()

    def sync_weights_from(self, model: nn.Module) -> None:
        """Push ``model``'s weights (plain or FSDP2-sharded; every rank must call this) into the engine,
        gathered in buckets of ``bucket_mb`` MiB and cast to the engine dtype."""
        self.load_weights(iter_full_weights(model, self.dtype, self.bucket_mb))
