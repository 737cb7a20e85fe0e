"""Trainers: behaviour-enhanced SFT, BAO multi-turn GRPO, FSDP2 wrapping, checkpoints."""
