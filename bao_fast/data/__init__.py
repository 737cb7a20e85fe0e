"""Packed multi-turn batches, chat templating and SFT datasets."""
