"""HFEngine against fp64 full-forward references on the tiny model (greedy, sampling, stops, limits)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bao_fast.config import RolloutConfig
from bao_fast.rollout import Generation, GenerationEngine, GenerationParams, HFEngine

from ._helpers import load_hf, perturb_, reference_greedy, reference_logprobs

PROMPTS = [[5, 17, 300, 41, 1022, 7, 7], [9, 8, 7], [1500, 3, 44, 45, 46, 47, 48, 49, 50, 51, 52], [2047]]
EOS = 2


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=64), device="cpu", max_batch_size=3)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_hf(tiny_model_dir)


def test_is_a_generation_engine(engine):
    assert isinstance(engine, GenerationEngine)


def test_greedy_matches_full_forward_reference(engine, reference):
    params = GenerationParams(max_tokens=9, temperature=0.0)
    gens = engine.generate(PROMPTS, params)  # 4 prompts, batches of 3: padding and two micro-batches
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == reference_greedy(reference, prompt, 9, {EOS})
        assert gen.finish_reason == ("stop" if gen.token_ids[-1] == EOS else "length")
        expected = reference_logprobs(reference, prompt, gen.token_ids, 0.0)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_stop_token_ends_generation_and_is_kept(engine):
    full = engine.generate([PROMPTS[0]], GenerationParams(max_tokens=8, temperature=0.0))[0]
    stop = full.token_ids[3]
    first = full.token_ids.index(stop)
    gen = engine.generate([PROMPTS[0]], GenerationParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert gen.token_ids == full.token_ids[: first + 1]
    assert gen.finish_reason == "stop"
    assert len(gen.logprobs) == len(gen.token_ids)


def test_output_is_clamped_to_max_model_len(engine, reference):
    long_prompt = list(range(10, 10 + 60))  # 60 tokens, max_model_len 64: room for 4
    short, long_ = engine.generate([PROMPTS[1], long_prompt], GenerationParams(max_tokens=20, temperature=0.0))
    clamped = reference_greedy(reference, long_prompt, 4, {EOS})
    assert len(clamped) == 4 and EOS not in clamped  # the tiny model does not stop: the context ends the output
    assert long_.token_ids == clamped and long_.finish_reason == "length"
    unclamped = reference_greedy(reference, PROMPTS[1], 20, {EOS})
    assert len(unclamped) == 20 and EOS not in unclamped  # the same batch's short prompt runs to max_tokens
    assert short.token_ids == unclamped and short.finish_reason == "length"


def test_sampling_is_seeded_and_logprobs_follow_temperature(engine, reference):
    params = GenerationParams(max_tokens=6, temperature=0.7, top_p=1.0, seed=11)
    state = torch.random.get_rng_state()
    first = engine.generate(PROMPTS, params)
    assert torch.equal(state, torch.random.get_rng_state()), "seeded sampling must not touch the global RNG"
    again = engine.generate(PROMPTS, params)
    other = engine.generate(PROMPTS, GenerationParams(max_tokens=6, temperature=0.7, seed=12))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    for prompt, gen in zip(PROMPTS, first):
        expected = reference_logprobs(reference, prompt, gen.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_logprobs_can_be_skipped(engine):
    gens = engine.generate(PROMPTS[:2], GenerationParams(max_tokens=3, temperature=0.0, return_logprobs=False))
    assert all(isinstance(g, Generation) and g.logprobs is None and len(g.token_ids) >= 1 for g in gens)


def test_load_weights_changes_outputs_and_validates(tiny_model_dir):
    engine = HFEngine.from_config(tiny_model_dir, RolloutConfig(max_model_len=64), device="cpu")
    policy = load_hf(tiny_model_dir)
    perturb_(policy, seed=3)
    params = GenerationParams(max_tokens=8, temperature=0.0)
    before = [g.token_ids for g in engine.generate(PROMPTS, params)]
    engine.sync_weights_from(policy)
    after = [g.token_ids for g in engine.generate(PROMPTS, params)]
    assert after == [reference_greedy(policy, p, 8, {EOS}) for p in PROMPTS]
    assert after != before
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop_token_ids": (2, -1)}, "stop_token_ids"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kwargs)


def test_prompt_validation(engine):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate([[1, 2], []], GenerationParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([list(range(64))], GenerationParams(max_tokens=2))


@pytest.fixture(scope="module")
def odd_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny model with a generation config that would bend sampling and a list of eos ids, as real
    checkpoints ship (Qwen-Instruct: repetition_penalty; Llama-3: several eos ids)."""
    path = tmp_path_factory.mktemp("odd")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": [EOS, 1500]}))
    (path / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 1.8, "no_repeat_ngram_size": 1, "eos_token_id": [EOS, 1500]}
    ))
    return path


def test_checkpoint_generation_config_does_not_bend_sampling(odd_checkpoint, reference):
    engine = HFEngine.from_config(odd_checkpoint, RolloutConfig(max_model_len=64), device="cpu")
    for prompt, gen in zip(PROMPTS, engine.generate(PROMPTS, GenerationParams(max_tokens=9, temperature=0.0))):
        assert gen.token_ids == reference_greedy(reference, prompt, 9, {EOS, 1500})
        expected = reference_logprobs(reference, prompt, gen.token_ids, 0.0)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)


def test_a_list_of_eos_ids_is_taken_whole(odd_checkpoint):
    engine = HFEngine.from_config(odd_checkpoint, RolloutConfig(max_model_len=64), device="cpu")
    assert engine.eos_token_ids == (EOS, 1500)  # generation stops at either (greedy test above)
    with pytest.raises(ValueError, match="eos_token_ids"):
        HFEngine(engine.model, max_model_len=64, eos_token_ids=(), pad_token_id=0)


def test_generation_config_eos_ids_stop_generation_too(tiny_model_dir, reference, tmp_path):
    """vLLM stops at the eos ids of generation_config.json as well (Qwen-Instruct lists <|endoftext|> there
    only); so does this engine, so both engines end turns on the same tokens."""
    shutil.copytree(tiny_model_dir, tmp_path, dirs_exist_ok=True)
    second_eos = 312  # the tiny model's third greedy token after PROMPTS[0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, second_eos]}))
    engine = HFEngine.from_config(tmp_path, RolloutConfig(max_model_len=64), device="cpu")
    assert engine.eos_token_ids == (EOS, second_eos)
    gens = engine.generate(PROMPTS, GenerationParams(max_tokens=9, temperature=0.0))
    assert gens[0].token_ids[-1] == second_eos and len(gens[0].token_ids) < 9
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == reference_greedy(reference, prompt, 9, {EOS, second_eos})
