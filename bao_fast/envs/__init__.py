"""Gym protocol, programmatic and LLM-user gyms, user-simulator client, scripted teachers."""

from bao_fast.envs.base import (
    TOOL_NAME,
    TOOL_SCHEMA,
    Gym,
    Outcome,
    ParseError,
    StepResult,
    ToolCall,
    build_system_prompt,
    format_tool_call,
    parse_tool_call,
)
from bao_fast.envs.function import FunctionGym, FunctionTask, evaluate_rule, generate_tasks, load_userrl_functions
from bao_fast.envs.registry import (
    GYMS,
    SCRIPTED_TEACHERS,
    TASKS,
    TEACHERS,
    make_gym,
    make_tasks,
    make_teacher,
    needs_user_simulator,
)
from bao_fast.envs.teachers import FunctionTeacher

__all__ = [
    "GYMS",
    "SCRIPTED_TEACHERS",
    "TASKS",
    "TEACHERS",
    "TOOL_NAME",
    "TOOL_SCHEMA",
    "FunctionGym",
    "FunctionTask",
    "FunctionTeacher",
    "Gym",
    "Outcome",
    "ParseError",
    "StepResult",
    "ToolCall",
    "build_system_prompt",
    "evaluate_rule",
    "format_tool_call",
    "generate_tasks",
    "load_userrl_functions",
    "make_gym",
    "make_tasks",
    "make_teacher",
    "needs_user_simulator",
    "parse_tool_call",
]
