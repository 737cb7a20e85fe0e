"""Gym protocol, programmatic and LLM-user gyms, user-simulator client, scripted teachers."""
