"""Varlen attention: packed log-probs, entropies and gradients equal running every trajectory alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, masking_utils
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import bao_fast.models.varlen_attention as varlen
from bao_fast.data.segments import pack_segments
from bao_fast.models import TinyModelSpec, create_tiny_model
from bao_fast.models.forward import packed_token_logprobs
from bao_fast.models.varlen_attention import VARLEN_IMPLEMENTATIONS, enable_varlen_attention, varlen_causal_attention

SPEC = TinyModelSpec(hidden_size=64, num_hidden_layers=2, intermediate_size=96)  # 2 query heads, 1 kv head
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "m", spec=SPEC, seed=11)


def _load(model_dir: Path, attn: str = "sdpa") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)


def _trajectories(vocab: int, lengths: list[list[int]], seed: int) -> list[list[tuple[str, list[int]]]]:
    """One trajectory per entry of ``lengths``: segments alternating user / assistant with those lengths."""
    gen = torch.Generator().manual_seed(seed)
    roles = ("user", "assistant")
    return [
        [(roles[i % 2], torch.randint(3, vocab, (n,), generator=gen).tolist()) for i, n in enumerate(lens)]
        for lens in lengths
    ]


BATCHES = {
    "mixed": [[7, 12, 3, 9], [1, 5], [4, 30, 2, 6], [2, 3]],
    "single_token_trajectory": [[5, 8], [0, 1], [3, 4, 2, 7]],  # the middle one is one assistant token
    "one_trajectory": [[6, 11, 4, 9]],
    "equal_lengths": [[4, 6], [5, 5], [7, 3], [2, 9]],  # three of 10 tokens: one batched attention call
}


def _separate(model: torch.nn.Module, trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """Per trajectory alone: logp / entropy of every row from the model's full logits."""
    logps, ents = [], []
    for traj in trajectories:
        ids = torch.tensor([t for _, seg in traj for t in seg])
        logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0] / TEMPERATURE, dim=-1)
        nxt = torch.cat([ids[1:], ids[:1]])  # the last row's target is not scored
        logps.append(logprobs.gather(1, nxt[:, None]).squeeze(1))
        ents.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.cat(logps), torch.cat(ents)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize(("attn", "checkpointing"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_varlen_equals_separate(model_dir: Path, batch_name: str, attn: str, checkpointing: bool) -> None:
    packed_model, ref_model = _load(model_dir, attn), _load(model_dir, attn)
    if checkpointing:  # the backward recomputes every layer: it must run varlen attention again
        packed_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        packed_model.train()
    trajectories = _trajectories(packed_model.config.vocab_size, BATCHES[batch_name], seed=len(batch_name))
    batch = pack_segments(trajectories)
    rows = batch.target_rows
    weights = torch.randn(rows.numel(), generator=torch.Generator().manual_seed(3))

    logp, ent = packed_token_logprobs(packed_model, batch, temperature=TEMPERATURE, return_entropy=True)
    assert packed_model.config._attn_implementation == VARLEN_IMPLEMENTATIONS[attn]
    ((logp[rows] * weights).sum() + ent[rows].sum()).backward()

    ref_logp, ref_ent = _separate(ref_model, trajectories)
    ((ref_logp[rows] * weights).sum() + ref_ent[rows].sum()).backward()
    torch.testing.assert_close(logp[rows], ref_logp[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[rows], ref_ent[rows], rtol=0, atol=1e-5)
    got, want = _grads(packed_model), _grads(ref_model)
    assert got.keys() == want.keys() and len(got) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


ARCHITECTURES = {"qwen2": SPEC, "llama": SPEC,  # (mistral's sliding window keeps it on its own attention)
                 "qwen3": TinyModelSpec(hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                        num_attention_heads=2, num_key_value_heads=1)}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_varlen_path_builds_no_mask_and_reads_no_device(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers neither builds a mask nor looks for packed sequences in ``position_ids`` (a device read:
    a host sync per forward on a GPU); every layer gets the trajectory lengths; values as running each alone."""
    model_dir = create_tiny_model(tmp_path / arch, spec=ARCHITECTURES[arch], seed=5, arch=arch)
    model, ref_model = _load(model_dir), _load(model_dir)
    trajectories = _trajectories(model.config.vocab_size, BATCHES["mixed"], seed=1)
    batch = pack_segments(trajectories)
    masks, detections, calls = [], [], []
    dense = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda **kw: masks.append(dense(**kw)))
    detect = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda *a, **kw: detections.append(1) or detect(*a, **kw))
    inner = varlen.varlen_causal_attention
    monkeypatch.setattr(varlen, "varlen_causal_attention", lambda *a, **kw: calls.append(a[3]) or inner(*a, **kw))
    logp = packed_token_logprobs(model, batch, temperature=TEMPERATURE)
    assert masks == [] and detections == []
    expected = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert [list(c) for c in calls] == [expected] * SPEC.num_hidden_layers
    rows = batch.target_rows
    torch.testing.assert_close(logp[rows], _separate(ref_model, trajectories)[0][rows], rtol=0, atol=1e-5)
    ref_model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False)  # can fail:
    assert detections  # a plain packed forward does run the detection


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_switched_model_unchanged_without_varlen(model_dir: Path, attn: str) -> None:
    """Outside packed_token_logprobs (padded batches, generation) the switched model computes as before."""
    base, switched = _load(model_dir, attn), _load(model_dir, attn)
    assert enable_varlen_attention(switched)
    ids = torch.randint(3, base.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, :4] = 0  # left padding
    torch.testing.assert_close(
        switched(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
    )


def test_enable_varlen_attention_falls_back(model_dir: Path) -> None:
    assert not enable_varlen_attention(torch.nn.Linear(2, 2))
    sliding = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            attn_implementation="sdpa",
        )
    )
    assert not enable_varlen_attention(sliding) and sliding.config._attn_implementation == "sdpa"
    model = _load(model_dir)
    model.config._attn_implementation = "flex_attention"  # builds its own block mask: left alone
    assert not enable_varlen_attention(model) and model.config._attn_implementation == "flex_attention"


def _dense_reference(q, k, v, seq_lens, scale):
    """fp64 attention with the explicit block-diagonal causal [T, T] mask."""
    seq = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    pos = torch.arange(seq.numel())
    allowed = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("seq_lens", [[5, 0, 1, 17, 3], [4, 4, 0, 4, 9, 9, 1, 1, 1, 0, 6]])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_varlen_causal_attention_matches_dense(heads: int, kv_heads: int, seq_lens: list[int]) -> None:
    gen = torch.Generator().manual_seed(heads)
    t, d = sum(seq_lens), 24
    q = torch.randn(1, heads, t, d, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(1, kv_heads, t, d, dtype=torch.float64, generator=gen) for _ in range(2))
    out = varlen_causal_attention(q, k, v, seq_lens, scaling=0.3)
    assert out.shape == (1, t, heads, d)
    torch.testing.assert_close(out, _dense_reference(q, k, v, seq_lens, 0.3), rtol=0, atol=1e-12)


def test_varlen_causal_attention_of_no_tokens_is_empty() -> None:
    q, k, v = torch.randn(1, 4, 0, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    assert varlen_causal_attention(q, k, v, [0, 0]).shape == (1, 0, 4, 8)


def test_varlen_causal_attention_rejects_bad_input() -> None:
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="seq_lens"):
        varlen_causal_attention(q, q, q, [2, 3])
    with pytest.raises(ValueError, match="seq_lens"):
        varlen_causal_attention(q, q, q, [7, -1])
    with pytest.raises(ValueError, match="query"):
        varlen_causal_attention(q.expand(2, -1, -1, -1), q, q, [6])
    assert torch.equal(
        varlen_causal_attention(q, q, q, [6]), F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2)
    )


def _fake_flash_varlen(calls: list[dict]):
    """``varlen_attn`` as torch documents it (``[T, H, D]`` operands, int32 ``cu_seq_q/k``, ``window_size=(-1, 0)``
    = causal, ``enable_gqa``), computed per sequence with SDPA; records what it was called with."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        calls.append({"cu": cu_seq_q.tolist(), "cu_k": cu_seq_k.tolist(), "dtype": cu_seq_q.dtype,
                      "max": (max_q, max_k), "window": window_size, "gqa": enable_gqa, "scale": scale})  # fmt: skip
        outs = []
        for lo, hi in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
            q, k, v = (x[lo:hi].transpose(0, 1)[None] for x in (query, key, value))
            causal = window_size == (-1, 0)
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa))
        return torch.cat(outs, dim=2)[0].transpose(0, 1)

    return varlen_attn


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_flash_varlen_path_passes_the_documented_arguments(monkeypatch, heads: int, kv_heads: int) -> None:
    """The CUDA fast path's glue, checked on the CPU against a stand-in that follows varlen_attn's contract; the
    real kernel is compared with the per-sequence path in the CUDA test below."""
    calls: list[dict] = []
    monkeypatch.setattr(varlen, "_FLASH_VARLEN", _fake_flash_varlen(calls))
    monkeypatch.setattr(varlen, "_flash_supports", lambda query: True)
    gen = torch.Generator().manual_seed(heads)
    seq_lens = [5, 0, 1, 17, 3]
    t, d = sum(seq_lens), 24
    q = torch.randn(1, t, heads, d, dtype=torch.float64, generator=gen).transpose(1, 2)  # transformers' layout
    k, v = (torch.randn(1, t, kv_heads, d, dtype=torch.float64, generator=gen).transpose(1, 2) for _ in range(2))

    out = varlen_causal_attention(q, k, v, seq_lens, scaling=0.3)
    assert calls == [{"cu": [0, 5, 5, 6, 23, 26], "cu_k": [0, 5, 5, 6, 23, 26], "dtype": torch.int32, "max": (17, 17),
                      "window": (-1, 0), "gqa": heads != kv_heads, "scale": 0.3}]  # fmt: skip
    assert out.shape == (1, t, heads, d)
    torch.testing.assert_close(out, _dense_reference(q, k, v, seq_lens, 0.3), rtol=0, atol=1e-12)
    varlen_causal_attention(q, k, v, seq_lens, scaling=0.3, dropout=0.1)  # dropout: the per-sequence path
    assert len(calls) == 1


def test_flash_causal_kwargs_follow_the_installed_signature() -> None:
    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False): ...
    def old(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None): ...
    def unknown(q, k, v, cu_q, cu_k, max_q, max_k): ...

    def no_scale(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False): ...

    kwargs = varlen._flash_causal_kwargs
    assert kwargs(new, gqa=True, scaling=None) == {"window_size": (-1, 0), "enable_gqa": True}
    assert kwargs(new, gqa=False, scaling=0.5) == {"window_size": (-1, 0), "scale": 0.5}
    assert kwargs(old, gqa=True, scaling=0.5) == {"is_causal": True, "scale": 0.5}
    assert kwargs(no_scale, gqa=False, scaling=None) == {"is_causal": True}
    assert kwargs(no_scale, gqa=False, scaling=0.5) is None  # a custom scale it cannot take: per-sequence path
    assert kwargs(unknown, gqa=False, scaling=None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_varlen_matches_per_sequence_sdpa_on_cuda(dtype: torch.dtype) -> None:
    if varlen._FLASH_VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    if varlen._flash_causal_kwargs(varlen._FLASH_VARLEN, gqa=True, scaling=0.125) is None:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn takes no causal flag or scale: packed batches use sdpa")
    gen = torch.Generator().manual_seed(0)
    seq_lens = [37, 0, 1, 300, 129]
    t, heads, kv_heads, d = sum(seq_lens), 8, 2, 64
    q = torch.randn(1, t, heads, d, generator=gen).to("cuda", dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, t, kv_heads, d, generator=gen).to("cuda", dtype).transpose(1, 2).requires_grad_()
            for _ in range(2))  # fmt: skip
    grad = torch.randn(1, t, heads, d, generator=gen).to("cuda", dtype)
    flash = varlen.flash_varlen_causal_attention(q, k, v, seq_lens, 0.125)
    assert flash is not None
    (flash * grad).sum().backward()
    flash_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    loop = varlen.sdpa_per_sequence_attention(q, k, v, seq_lens, scaling=0.125)
    (loop * grad).sum().backward()
    torch.testing.assert_close(flash.float(), loop.float(), rtol=0, atol=2e-2)
    for got, x in zip(flash_grads, (q, k, v), strict=True):
        torch.testing.assert_close(got.float(), x.grad.float(), rtol=0, atol=5e-2)
