"""SFT data (BAO.md stage 1): teacher episodes over the training tasks, the solved ones kept, as the token
segments a rollout of the same dialogue produces.

``sft.teacher``: ``scripted`` plays the gym's programmatic teacher (``SCRIPTED_TEACHERS``); ``llm`` prompts a
model behind an OpenAI-compatible server (``sft.teacher_*``) on any gym, and LLM-user gyms talk to their user
simulator at ``env.user_base_url``, or at the teacher's server when that is empty.

Attempt ``i`` plays training task ``i mod len(tasks)`` with seed ``derive_seed(cfg.seed, 1, i)``; the data
are the first ``sft.num_trajectories`` solved attempts in attempt order, however many ranks and threads
played them. Attempts run in waves spread over the ranks (and, for the LLM teacher, over
``sft.teacher_workers`` threads per rank). :func:`sft_episodes` keeps the solved dialogues in
``<run_dir>/sft-data.jsonl`` with the settings that produced them; a resumed run with the same settings reads
the file instead of asking the teacher again, so an interrupted SFT continues on the very same data.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from bao_fast.config import SERVER_ADDRESS_KEYS, Config, ConfigError
from bao_fast.envs import SCRIPTED_TEACHERS, needs_user_simulator
from bao_fast.envs.teachers.episode import TeacherEpisode
from bao_fast.envs.teachers.llm_teacher import LLMTeacher
from bao_fast.envs.user_client import UserSimulatorClient
from bao_fast.eval.evaluate import gym_factory
from bao_fast.rollout import ChatFormat
from bao_fast.train.collectives import gather_objects
from bao_fast.train.runtime import config_tasks, derive_seed

Segments = list[tuple[str, list[int]]]
Messages = list[dict[str, str]]
SFT_DATA_FILE = "sft-data.jsonl"
MAX_ATTEMPTS_PER_TRAJECTORY = 4


def sft_teacher(cfg: Config) -> Any:
    """The teacher ``sft.teacher`` names: ``play(task, seed) -> TeacherEpisode``."""
    s, env = cfg.sft, cfg.env
    if s.teacher == "llm":
        client = UserSimulatorClient(s.teacher_base_url, s.teacher_model, api_key=os.environ.get("OPENAI_API_KEY"),
                                     max_concurrency=s.teacher_workers)
        user = client if needs_user_simulator(env.name) and not env.user_base_url else None
        return LLMTeacher(client, gym_factory(cfg, user), max_tokens=s.teacher_max_tokens,
                          temperature=s.teacher_temperature)
    factory = SCRIPTED_TEACHERS.get(env.name)
    if factory is None:
        raise ConfigError(
            f"config key 'sft.teacher': the {env.name!r} gym has no scripted teacher; set sft.teacher=llm with "
            "sft.teacher_base_url and sft.teacher_model (or sft.enabled=false)"
        )
    kwargs: dict[str, Any] = {"max_turns": env.max_turns, "seed": cfg.seed}
    if s.teacher_style != "full":
        if "style" not in inspect.signature(factory).parameters:
            raise ConfigError(
                f"config key 'sft.teacher_style': the {env.name!r} teacher only writes the 'full' style, "
                f"got {s.teacher_style!r}"
            )
        kwargs["style"] = s.teacher_style
    return factory(**kwargs)


def _play_wave(cfg: Config, teacher: Any, tasks: list[Any], attempts: range, pool: ThreadPoolExecutor
               ) -> list[tuple[int, TeacherEpisode]]:
    """Play this rank's share of ``attempts`` (every world-size-th one) on ``pool``; ``(attempt, episode)``
    pairs of every rank, sorted by attempt. An error on any rank raises on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = attempts[rank::world]
    played: list[tuple[int, TeacherEpisode]] = []
    error: BaseException | None = None
    try:
        episodes = pool.map(lambda i: teacher.play(tasks[i % len(tasks)], seed=derive_seed(cfg.seed, 1, i)), mine)
        played = list(zip(mine, episodes, strict=True))
    except Exception as exc:  # every rank must reach the gather below, or the others would wait forever
        error = exc
    shares = gather_objects((played, None if error is None else repr(error))) if world > 1 else [(played, None)]
    if error is not None:
        raise error
    failed = [(r, message) for r, (_, message) in enumerate(shares) if message is not None]
    if failed:
        raise RuntimeError(f"the SFT teacher failed on rank {failed[0][0]}: {failed[0][1]}")
    return sorted((pair for share, _ in shares for pair in share), key=lambda pair: pair[0])


def solved_episodes(cfg: Config) -> list[Messages]:
    """The dialogues of the first ``sft.num_trajectories`` solved attempts (see the module docstring).
    Collective when a process group is up. ConfigError when fewer than that are solved within
    ``MAX_ATTEMPTS_PER_TRAJECTORY`` times as many attempts."""
    n = cfg.sft.num_trajectories
    env = cfg.env
    tasks = config_tasks(cfg, "train", env.num_train_tasks, "env.num_train_tasks")
    teacher = sft_teacher(cfg)
    workers = cfg.sft.teacher_workers if cfg.sft.teacher == "llm" else 1
    wave = workers * (dist.get_world_size() if dist.is_initialized() else 1)
    budget = n * MAX_ATTEMPTS_PER_TRAJECTORY
    solved: list[Messages] = []
    played = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sft-teacher") as pool:
        while played < budget and len(solved) < n:
            attempts = range(played, min(played + wave, budget))
            for _, episode in _play_wave(cfg, teacher, tasks, attempts, pool):
                if episode.success and len(solved) < n:
                    solved.append(episode.messages)
            played = attempts.stop
    if len(solved) < n:
        raise ConfigError(
            f"config key 'sft.num_trajectories': the teacher solved only {len(solved)} of {played} episodes, fewer "
            f"than the {n} requested (env.max_turns={env.max_turns}, env.level={env.level}); lower "
            "sft.num_trajectories or give the teacher more turns"
        )
    return solved


def data_source(cfg: Config) -> dict[str, Any]:
    """The settings that determine the SFT episodes (recorded in, and checked against, the data file)."""
    s = cfg.sft
    teacher = {k: v for k, v in vars(s).items() if k.startswith("teacher") and k != "teacher_workers"}
    return {"seed": cfg.seed, "num_trajectories": s.num_trajectories, "env": dict(vars(cfg.env)), **teacher}


_SERVER_ADDRESSES = {key.rsplit(".", 1)[1] for key in SERVER_ADDRESS_KEYS}
"""Their names in :func:`data_source`: a server restarted on another port must neither replay the teacher nor
refuse the recorded episodes."""


def _same_source(recorded: Any, source: dict[str, Any]) -> bool:
    """Whether a data file's recorded source is ``source``, server addresses aside."""
    def comparable(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: comparable(v) for k, v in tree.items() if k not in _SERVER_ADDRESSES}
        return tree

    return comparable(recorded) == comparable(json.loads(json.dumps(source)))


def data_digest(episodes: list[Messages]) -> str:
    """A short fingerprint of the episodes (SFT checkpoints record it; resuming on other data is refused)."""
    return hashlib.blake2b(json.dumps(episodes, sort_keys=True).encode(), digest_size=16).hexdigest()


def _read_data(path: Path, source: dict[str, Any]) -> list[Messages] | None:
    """The episodes in ``path`` if it was written for ``source``, else None."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if not lines or not _same_source(json.loads(lines[0]).get("source"), source):
        return None
    return [json.loads(line)["messages"] for line in lines[1:]]


def _write_data(path: Path, source: dict[str, Any], episodes: list[Messages]) -> None:
    """Write the data file atomically (a killed run leaves the old file or none, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"source": source}) + "\n")
        for messages in episodes:
            f.write(json.dumps({"messages": messages}) + "\n")
    os.replace(tmp, path)


def sft_episodes(cfg: Config) -> list[Messages]:
    """The SFT dialogues of this run (collective): read from ``<run_dir>/sft-data.jsonl`` when
    ``checkpoint.resume`` and the file was written with the same :func:`data_source`, else played by the
    teacher and written there by rank 0."""
    path = Path(cfg.run_dir) / SFT_DATA_FILE
    source = data_source(cfg)
    main = not dist.is_initialized() or dist.get_rank() == 0
    cached = _read_data(path, source) if main and cfg.checkpoint.resume else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        cached = gather_objects(cached)[0]
    if cached is not None:
        return cached
    episodes = solved_episodes(cfg)
    if main:
        _write_data(path, source, episodes)
    return episodes


def messages_to_segments(fmt: ChatFormat, messages: Messages) -> Segments:
    """A solved chat episode as rollout-identical segments: ``[("user", opening prompt ids),
    ("assistant", content ids + eos), ("user", feedback ids incl. the next generation prompt), ...]``,
    ending at the last assistant message. Message contents are plain text (``ChatFormat.text_ids``)."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("messages: the episode has no assistant message")
    first = roles.index("assistant")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    segments: Segments = [("user", fmt.prompt_ids(messages[:first]))]
    for message in messages[first : last + 1]:
        if message["role"] == "assistant":
            segments.append(("assistant", [*fmt.text_ids(message["content"]), fmt.tokenizer.eos_token_id]))
        else:
            segments.append(("user", fmt.feedback_ids(message["content"], assistant_ended_with_eos=True)))
    return segments


def to_segments(episodes: list[Messages], tokenizer: PreTrainedTokenizerBase) -> list[Segments]:
    """Every dialogue of ``episodes`` as segments (:func:`messages_to_segments`)."""
    fmt = ChatFormat.from_tokenizer(tokenizer)
    return [messages_to_segments(fmt, messages) for messages in episodes]


def teacher_dataset(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> list[Segments]:
    """Segments of freshly played :func:`solved_episodes` (no data file)."""
    return to_segments(solved_episodes(cfg), tokenizer)
