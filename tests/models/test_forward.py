"""``packed_token_logprobs``: one packed backbone pass equals running every trajectory on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model
from bao_fast.models.forward import backbone, lm_head, packed_token_logprobs

SPEC = TinyModelSpec(hidden_size=64, num_hidden_layers=2, intermediate_size=96)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "m", spec=SPEC, seed=5)


def _trajectories(vocab: int, seed: int = 0) -> list[list[tuple[str, list[int]]]]:
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [
        [("system", toks(5)), ("user", toks(4)), ("assistant", toks(6)), ("observation", toks(3)),
         ("assistant", toks(4))],
        [("user", toks(1)), ("assistant", toks(1))],
        [("system", toks(7)), ("assistant", toks(9)), ("user", toks(2)), ("assistant", toks(5))],
    ]


def _separate(model, trajectories, temperature):
    """Per trajectory: full logits from the model's own forward, log-softmax and entropy in fp64."""
    logps, ents = [], []
    for traj in trajectories:
        ids = torch.tensor([t for _, seg in traj for t in seg])
        logits = model(input_ids=ids[None]).logits[0].double() / temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        nxt = torch.cat([ids[1:], ids[:1]])  # last row's target is ignored; any valid index will do
        logps.append(logprobs.gather(1, nxt[:, None]).squeeze(1))
        ents.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.cat(logps), torch.cat(ents)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_separate(model_dir: Path, attn: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    trajectories = _trajectories(model.config.vocab_size)
    batch = pack_segments(trajectories)
    logp, ent = packed_token_logprobs(model, batch, temperature=0.8, return_entropy=True)
    ref_logp, ref_ent = _separate(model, trajectories, 0.8)
    rows = batch.target_rows
    trained = torch.tensor([role == "assistant" for traj in trajectories for role, seg in traj for _ in seg])
    starts = torch.tensor([i == 0 for traj in trajectories for i in range(sum(len(seg) for _, seg in traj))])
    expected_rows = (trained[1:] & ~starts[1:]).nonzero().squeeze(1)  # row t predicts a trained token t+1
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(logp[rows].double(), ref_logp[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[rows].double(), ref_ent[rows], rtol=0, atol=1e-5)
    off = torch.ones(batch.num_tokens, dtype=torch.bool)
    off[rows] = False
    assert torch.all(logp[off] == 0) and torch.all(ent[off] == 0)


def test_gradients_reach_backbone_and_head(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = pack_segments(_trajectories(model.config.vocab_size, seed=1))
    logp = packed_token_logprobs(model, batch)
    logp.sum().backward()
    weight, bias = lm_head(model)
    assert bias is None and weight.grad is not None and weight.grad.abs().sum() > 0
    layer_grads = [p.grad for p in backbone(model).parameters() if p.requires_grad]
    assert all(g is not None for g in layer_grads) and sum(g.abs().sum() for g in layer_grads) > 0


def test_unsupported_head_raises(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        packed_token_logprobs(model, pack_segments(_trajectories(model.config.vocab_size)))
