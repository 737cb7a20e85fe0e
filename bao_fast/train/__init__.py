"""Trainers: behaviour-enhanced SFT, BAO multi-turn GRPO, FSDP2 wrapping, checkpoints.

- ``sft.py``: teacher episodes -> packed assistant-only NLL -> ``<run_dir>/sft-model`` (``bao-fast sft``),
  resumable from ``<run_dir>/sft-checkpoints`` until the export is written.
- ``sft_data.py``: the scripted or LLM teacher plays the training tasks (over ranks and threads); solved
  episodes -> ``<run_dir>/sft-data.jsonl`` -> rollout-identical token segments.
- ``rl.py``: the BAO loop, one function per algorithm step (``bao-fast train``, SFT first when enabled).
- ``demo.py``: the embedded default run and its SFT-vs-RL report (``bao-fast demo``).
- ``fsdp.py``: process group, device mesh, the FSDP2-sharded :class:`~bao_fast.train.fsdp.Policy`.
- ``checkpoint.py``: atomic DCP checkpoints for exact resume (resharded onto another world size); HF export.
- ``preemption.py``: SIGTERM / SIGUSR1 stop the trainers at the next step boundary, with a checkpoint.
- ``optim.py``, ``logging.py``: AdamW + schedules; JSONL / progress / TensorBoard / wandb and the
  non-finite guard.
- ``runtime.py``: seeding, the resumable task sampler, the initial model, a run's start (preflight checks,
  the ``run_dir`` lock of ``run_lock.py``, clearing an earlier run's outputs, ``config.yaml``).
- ``collectives.py``: small host-side collectives that keep the ranks in lock-step.
- ``loss_scale.py``: dynamic loss scaling for float16 training (``optim.loss_scale``).

Modules are imported directly (``from bao_fast.train.rl import train``); importing this package is cheap.
"""
