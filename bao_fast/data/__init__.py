"""Packed multi-turn batches (``packed``) and their segment layout (``segments``). DESIGN.md also puts chat
templating and SFT datasets here; they live next to their only users instead: ``bao_fast.rollout.chat_format``
(the rollout engines and SFT render turns with it) and ``bao_fast.train.sft_data`` (SFT's teacher episodes)."""
