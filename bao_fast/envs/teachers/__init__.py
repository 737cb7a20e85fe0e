"""Scripted teachers that solve programmatic gyms and write BAO's behaviours into their reasoning."""

from bao_fast.envs.teachers.function_teacher import FunctionTeacher, TeacherEpisode, solve_rate

__all__ = ["FunctionTeacher", "TeacherEpisode", "solve_rate"]
