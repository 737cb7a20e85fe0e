"""Function gym: safe evaluator, rule grammar and generator, gym rules and rewards, UserRL-format loading."""

from __future__ import annotations

import ast
import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bao_fast.envs import make_gym, make_tasks
from bao_fast.envs.arith import MAX_MAGNITUDE, evaluate_array, format_number, parse_expression
from bao_fast.envs.function import (
    FunctionGym,
    FunctionTask,
    RuleError,
    UndefinedResult,
    evaluate_rule,
    generate_tasks,
    load_userrl_functions,
    load_userrl_split,
    parse_inputs,
    userrl_split,
)
from bao_fast.envs.function_grammar import LEVELS, TEMPLATES, VARIABLES, templates_for

# ------------------------------------------------------------------------------------------ safe evaluator


def _oracle(rule: str, env: dict[str, int]) -> float:
    """Test-only oracle: Python itself, on expressions the test generated from the whitelist."""
    return float(eval(compile(rule, "<rule>", "eval"), {"__builtins__": {}}, dict(env)))


def _largest_intermediate(rule: str, env: dict[str, int]) -> float:
    """Test-only: the largest magnitude of any sub-expression of ``rule``, each evaluated by Python itself."""
    values = [
        abs(_oracle(ast.unparse(node), env)) for node in ast.walk(ast.parse(rule, mode="eval"))
        if isinstance(node, (ast.BinOp, ast.UnaryOp))
    ]  # fmt: skip
    return max(values, default=0.0)


_LEAF = st.one_of(st.sampled_from(VARIABLES), st.integers(0, 9).map(str))
_EXPR = st.recursive(
    _LEAF,
    lambda sub: st.one_of(
        st.tuples(sub, st.sampled_from(["+", "-", "*", "/"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.integers(0, 3)).map(lambda t: f"({t[0]}) ** {t[1]}"),
        sub.map(lambda e: f"-({e})"),
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(_EXPR, st.tuples(*[st.integers(-10, 10)] * 4))
def test_evaluate_matches_python_arithmetic(rule: str, point: tuple[int, int, int, int]) -> None:
    env = dict(zip(VARIABLES, point, strict=True))
    try:
        expected = _oracle(rule, env)
    except ZeroDivisionError:
        with pytest.raises(UndefinedResult):
            evaluate_rule(rule, *point)
        return
    if not math.isfinite(expected) or abs(expected) > MAX_MAGNITUDE / 10:
        return
    try:
        got = evaluate_rule(rule, *point)
    except RuleError:  # only when an intermediate value left the bounds (the exponents here are at most 3)
        assert _largest_intermediate(rule, env) > MAX_MAGNITUDE, rule
        return
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    vec = evaluate_array(parse_expression(rule, set(VARIABLES)), {k: np.float64(v) for k, v in env.items()})
    assert float(vec) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("__import__('os').system('true')", "syntax Call is not allowed"),
        ("a.__class__", "syntax Attribute is not allowed"),
        ("(lambda: 1)()", "syntax Call is not allowed"),
        ("a if b else c", "syntax IfExp is not allowed"),
        ("a < b", "syntax Compare is not allowed"),
        ("[a, b]", "syntax List is not allowed"),
        ("'a' * 3", "literal 'a' is not a real number"),
        ("a // b", r"operator FloorDiv is not allowed \(only \+ - \* / \*\*\)"),
        ("a % b", "operator Mod is not allowed"),
        ("a @ b", "operator MatMult is not allowed"),
        ("~a", "unary operator Invert is not allowed"),
        ("not a", "unary operator Not is not allowed"),
        ("abs(a)", "syntax Call is not allowed"),
        ("x + a", r"name 'x' is not allowed; variables are \['a', 'b', 'c', 'd'\]"),
        ("True + a", "literal True is not a real number"),
        ("1e999 * a", r"literal inf is out of range \(\|x\| <= 1e\+15\)"),
        ("10 ** 16 + a", r"intermediate result exceeds 1e\+15 in magnitude"),
        ("a; b", "expression 'a; b' is not valid arithmetic"),
        ("a = 1", "expression 'a = 1' is not valid arithmetic"),
        ("(" * 300 + "a" + ")" * 300, "expression longer than 256 characters"),
        (" + ".join(["a"] * 200), "expression longer than 256 characters"),
        ("+".join(["a"] * 100), "expression has more than 128 syntax nodes"),  # 199 characters
        ("", "expression '' is not valid arithmetic"),
        ("1j * a", "literal 1j is not a real number"),
    ],
)
def test_evaluator_rejects_attacks(attack: str, reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        evaluate_rule(attack, 1, 2, 3, 4)


@pytest.mark.parametrize(
    ("rule", "point", "reason"),
    [("a ** 100000", (2, 1, 1, 1), "exponent 100000 exceeds 64"),
     ("9 ** 9 ** 9", (1, 1, 1, 1), "exponent 387420489 exceeds 64"),
     ("a ** b ** c", (10, 10, 10, 1), "exponent 10000000000 exceeds 64"),
     ("a * b * c * d * a * b * c * d", (1000, 1000, 1000, 1000), r"intermediate result exceeds 1e\+15")],
)
def test_evaluator_bounds_huge_values(rule: str, point: tuple[int, ...], reason: str) -> None:
    with pytest.raises(RuleError, match=reason) as info:
        evaluate_rule(rule, *point)
    assert not isinstance(info.value, UndefinedResult)


@pytest.mark.parametrize(("rule", "point"), [("1e-10 ** -64", (1, 1, 1, 1)), ("(a / b) ** c", (1, 10**9, -60, 1))])
def test_evaluator_bounds_small_bases_to_negative_powers(rule: str, point: tuple[int, ...]) -> None:
    """|base| < 1 to a large negative power is bounded like a large base, not left to overflow the float."""
    with pytest.raises(RuleError) as info:
        evaluate_rule(rule, *point)
    assert not isinstance(info.value, UndefinedResult)
    assert evaluate_rule("0.5 ** -a", 10, 1, 1, 1) == 1024.0


def test_gym_survives_overflowing_powers() -> None:
    gym = FunctionGym()
    gym.reset(FunctionTask("t1", "(a / b) ** c + d", (1, 2, 3, 4), 4.125))
    assert "too large" in gym.step("[action] 1 1000000000 -60 1").feedback
    assert gym.step("[answer] 1e-10**-64").feedback.startswith("Invalid answer")


@pytest.mark.parametrize("rule", ["a / (b - c)", "0 ** -a", "(b - 3) ** -1", "(a - 2) ** 0.5"])
def test_evaluator_undefined(rule: str) -> None:
    with pytest.raises(UndefinedResult):
        evaluate_rule(rule, 1, 3, 3, 4)


def test_evaluator_is_exact_on_integers_and_formats_numbers() -> None:
    assert evaluate_rule("a * b * c * d - 1", 9999, 9999, 9999, 999) == 9999**3 * 999 - 1
    assert evaluate_rule("(a + b) / c", 1, 2, 3, 4) == 1.0
    assert format_number(3.0) == "3" and format_number(-0.5) == "-0.5" and float(format_number(1 / 3)) == 1 / 3


# ------------------------------------------------------------------------------------------------ grammar


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.pattern)
def test_rendered_rules_match_vectorised_grammar(template) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(template.pattern)
    points = np.asarray([[rng.randint(1, 10) for _ in range(4)] for _ in range(5)])
    values = template.evaluate_all(points.astype(np.float64))
    instances = list(template.instances())
    assert values.shape == (len(instances), len(points))
    for i in rng.sample(range(len(instances)), min(12, len(instances))):
        rule = template.render(*instances[i])
        assert all(v in rule for v in VARIABLES)
        got = [evaluate_rule(rule, *map(int, p)) for p in points]
        np.testing.assert_allclose(got, values[i], rtol=1e-12, atol=1e-12)


def _is_linear(rule: str) -> bool:
    rng = random.Random(0)
    for _ in range(5):
        x, y = [rng.randint(-5, 5) for _ in range(4)], [rng.randint(-5, 5) for _ in range(4)]
        try:
            fx, fy, f0 = evaluate_rule(rule, *x), evaluate_rule(rule, *y), evaluate_rule(rule, 0, 0, 0, 0)
            fxy = evaluate_rule(rule, *(i + j for i, j in zip(x, y, strict=True)))
        except UndefinedResult:
            return False
        if not math.isclose(fxy, fx + fy - f0, abs_tol=1e-9):
            return False
    return True


@pytest.mark.parametrize("level", LEVELS)
def test_generate_tasks_properties(level: int) -> None:
    tasks = generate_tasks(40, level, seed=3)
    assert tasks == generate_tasks(40, level, seed=3) and tasks != generate_tasks(40, level, seed=4)
    assert len({t.rule for t in tasks}) == 40 and len({t.id for t in tasks}) == 40
    for t in tasks:
        assert all(1 <= x <= 10 for x in t.test_case) and all(v in t.rule for v in VARIABLES)
        assert t.expected_result == evaluate_rule(t.rule, *t.test_case) and abs(t.expected_result) <= 1e6
    rules = " ".join(t.rule for t in tasks)
    if level == 1:
        assert all(_is_linear(t.rule) for t in tasks)
    else:
        assert not all(_is_linear(t.rule) for t in tasks)
    assert ("/" in rules) == (level >= 4) and ("**" in rules) == (level == 5)


def test_generate_tasks_split_and_errors() -> None:
    train = generate_tasks(60, (1, 2, 3, 4, 5), seed=0, split="train")
    test = generate_tasks(30, (1, 2, 3, 4, 5), seed=0, split="test")
    assert not {t.rule for t in train} & {t.rule for t in test}
    assert {t.id.split("-")[1] for t in train} == {f"L{lv}" for lv in LEVELS}
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        generate_tasks(-1, 1, seed=0)
    with pytest.raises(ValueError, match=r"level must be in \(1, 2, 3, 4, 5\) or a non-empty sequence of them, got 6"):
        generate_tasks(2, 6, seed=0)
    with pytest.raises(ValueError, match=r"level must be in .* or a non-empty sequence of them, got \(\)"):
        generate_tasks(2, (), seed=0)
    with pytest.raises(ValueError, match="split"):
        generate_tasks(2, 1, 0, split="val")
    with pytest.raises(ValueError, match="level"):
        templates_for(0)


def test_function_task_validation() -> None:
    with pytest.raises(ValueError, match="test_case"):
        FunctionTask("x", "a + b + c + d", (1, 2, 3), 6.0)  # type: ignore[arg-type]
    with pytest.raises(RuleError, match="syntax Attribute is not allowed"):
        FunctionTask("x", "a.real", (1, 2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="expected_result"):
        FunctionTask("x", "a + b + c + d", (1, 2, 3, 4), math.nan)


# ---------------------------------------------------------------------------------------------------- gym


@pytest.fixture
def task() -> FunctionTask:
    return FunctionTask("t0", "(a + b) * c / d", (3, 5, 7, 2), 28.0)


def test_gym_rules_and_rewards(task: FunctionTask) -> None:
    gym = make_gym("function", max_turns=15)
    messages = gym.reset(task)
    assert [m["role"] for m in messages] == ["system", "user"] and "interact_with_env" in messages[0]["content"]
    assert task.rule not in messages[0]["content"]
    r = gym.step("[action] 1 2 3 4")
    assert r.feedback == f"f(1, 2, 3, 4) = {format_number((1 + 2) * 3 / 4)}\nReward: 0.0" and r.reward == 0.0
    assert gym.step("[action] (2, 2, 2, 2)").feedback.startswith("f(2, 2, 2, 2) = 4")
    assert "cannot query the test case" in gym.step("[action] 3 5 7 2").feedback
    assert gym.step("[action] 1 1 1 0").feedback.startswith("f(1, 1, 1, 0) is undefined")
    assert "too large" in gym.step("[action] 100000000 1 100000000 1").feedback
    for bad in ("[action] 1 2 3", "[action] 1 2 3 4.5", "[action] a b c d", "[action] 1 2 3 4 5"):
        assert gym.step(bad).feedback.startswith("Invalid action")
    assert gym.step("[search] foo").feedback.startswith("Invalid search")
    s = gym.step("[search] test")
    assert "(3, 5, 7, 2)" in s.feedback and s.info["choice"] == "search" and not s.info["user_involved"]
    assert gym.step("[answer] seven").feedback.startswith("Invalid answer")
    wrong = gym.step("[answer] 28.00001")
    assert wrong.reward == 0.0 and not wrong.terminated and wrong.info["user_involved"]
    assert gym.num_turns == 13 and not gym.done
    right = gym.step("[answer] 28.0000009")
    assert right.reward == 1.0 and right.terminated and right.info["success"] and gym.done
    assert right.feedback.endswith("Reward: 1.0")


@pytest.mark.parametrize("answer", ["28", "28.0", " 56/2 ", "2.8e1", "28."])
def test_gym_answer_forms(task: FunctionTask, answer: str) -> None:
    gym = FunctionGym()
    gym.reset(task)
    assert gym.step(f"[answer] {answer}").reward == 1.0


def test_gym_budget_and_type_checks(task: FunctionTask) -> None:
    gym = FunctionGym(max_turns=2)
    with pytest.raises(TypeError, match="FunctionTask"):
        gym.reset({"rule": "a"})
    gym.reset(task)
    assert not gym.step("[action] 1 1 1 1").truncated
    last = gym.step("[answer] 1")
    assert last.truncated and not last.terminated and gym.done
    with pytest.raises(ValueError, match="tolerance"):
        FunctionGym(tolerance=-1.0)


def test_parse_inputs() -> None:
    assert parse_inputs(" 1, -2, 3 ,4 ") == (1, -2, 3, 4) and parse_inputs("[1 2 3 4]") == (1, 2, 3, 4)
    assert parse_inputs("1 2 3") is None and parse_inputs("1 2 3 " + "9" * 5000) is None


# ------------------------------------------------------------------------------------------------ loaders


def _rows(n: int) -> list[dict]:
    rng = random.Random(n)
    rows = []
    for i in range(n):
        tc = [rng.randint(1, 10) for _ in range(4)]
        rule = "a * (b + c) / d" if i % 2 else "a ** 2 + b * c - d"
        rows.append({"id": f"func-{i}" if i % 3 else i, "rule": rule, "test_case": tc,
                     "expected_result": evaluate_rule(rule, *tc)})
    return rows


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_load_userrl_functions(tmp_path: Path) -> None:
    rows = _rows(7)
    rows[1]["test_case"] = " ".join(map(str, rows[1]["test_case"]))
    rows[2]["expected_result"] = str(rows[2]["expected_result"])
    tasks = load_userrl_functions(_write(tmp_path / "functions.json", rows))
    assert [t.id for t in tasks] == [str(r["id"]) for r in rows]
    assert all(isinstance(t.test_case, tuple) and len(t.test_case) == 4 for t in tasks)
    assert tasks[2].expected_result == float(rows[2]["expected_result"])
    chosen = load_userrl_functions(tmp_path / "functions.json", ids=["func-4", 0])
    assert [t.id for t in chosen] == ["func-4", "0"]
    with pytest.raises(ValueError, match="nope"):
        load_userrl_functions(tmp_path / "functions.json", ids=["nope"])


def test_answers_python_would_warn_about_are_invalid_silently() -> None:
    gym = FunctionGym()
    gym.reset(generate_tasks(1, 1, seed=3)[0], seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = gym.step("[answer] 31and")  # Python's parser warns: invalid decimal literal
    assert [w.message for w in caught] == []
    assert result.info["choice"] == "answer" and result.reward == 0.0 and "Invalid answer" in result.feedback


def test_loaded_task_is_checked_against_f_not_the_files_rounded_value(tmp_path: Path) -> None:
    """BAO.md checks an answer against f(test case): a file value within the loader's relative 1e-6 of f but
    beyond the gym's absolute tolerance must not turn the exact answer into a wrong one."""
    row = {"id": "big", "rule": "a**b + c*d", "test_case": [10, 7, 1, 1], "expected_result": 10000001.5}
    verified, = load_userrl_functions(_write(tmp_path / "functions.json", [row]))
    assert verified.expected_result == 10000001.0
    gym = FunctionGym()
    gym.reset(verified, seed=0)
    result = gym.step("<think>f is known.</think>\n[answer] 10000001")
    assert (result.reward, result.terminated) == (1.0, True)
    unverified, = load_userrl_functions(tmp_path / "functions.json", verify=False)
    assert unverified.expected_result == 10000001.5  # nothing to compute it from but the file


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"rule": "__import__('os')"}, "row 3.*bad rule"),
        ({"rule": ["a + b + c + d"]}, "row 3.*bad rule.*must be a str"),
        ({"test_case": [1, 2, 3]}, "row 3.*test_case"),
        ({"test_case": [1, 2, 3, True]}, "row 3.*test_case"),
        ({"expected_result": "n/a"}, "row 3.*expected_result"),
        ({"expected_result": 123456.0}, "row 3.*expected_result is 123456"),
        ({"id": None}, "row 3.*'id'"),
        ({"id": "func-1"}, "row 3: duplicate id"),
    ],
)
def test_load_userrl_functions_names_bad_row(tmp_path: Path, patch: dict, match: str) -> None:
    rows = _rows(5)
    rows[3].update(patch)
    with pytest.raises(ValueError, match=match):
        load_userrl_functions(_write(tmp_path / "f.json", rows))


def test_load_userrl_functions_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON list"):
        load_userrl_functions(_write(tmp_path / "f.json", {"rows": []}))
    rows = _rows(3)
    del rows[2]["rule"]
    with pytest.raises(ValueError, match=r"row 2: missing keys \['rule'\]"):
        load_userrl_functions(_write(tmp_path / "f.json", rows))
    rows = _rows(3)
    rows[0]["expected_result"] += 1.0
    assert load_userrl_functions(_write(tmp_path / "f.json", rows), verify=False)[0].expected_result == pytest.approx(
        rows[0]["expected_result"]
    )


def test_split_loaders(tmp_path: Path) -> None:
    split = load_userrl_split(_write(tmp_path / "s.json", {"train": ["a", 2], "test": ["c"], "val": []}))
    assert split == {"train": ["a", "2"], "test": ["c"], "val": []}
    with pytest.raises(ValueError, match="both"):
        load_userrl_split(_write(tmp_path / "s.json", {"train": ["a"], "test": ["a"]}))
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_userrl_split(_write(tmp_path / "s.json", {"train": ["a"]}))
    with pytest.raises(ValueError, match="'test' must be a list"):
        load_userrl_split(_write(tmp_path / "s.json", {"train": ["a"], "test": "b"}))


def test_userrl_split_reproduces_their_preprocessing() -> None:
    tasks = generate_tasks(538, (1, 2, 3, 4, 5), seed=1)
    train, test = userrl_split(tasks)
    assert len(train) == 460 and len(test) == 78
    reference = list(tasks)  # UserRL: np.random.seed(42); np.random.shuffle(dataset); dataset[:460]
    np.random.RandomState(42).shuffle(reference)
    assert train == reference[:460] and test == reference[460:]


def test_make_tasks_from_files(tmp_path: Path) -> None:
    rows = _rows(10)
    _write(tmp_path / "functions.json", rows)
    _write(tmp_path / "split.json", {"train": ["func-1", "func-2"], "test": ["0", "func-4"]})
    test = make_tasks("function", split="test", path=str(tmp_path))
    assert [t.id for t in test] == ["0", "func-4"]
    assert len(make_tasks("function", split="all", path=str(tmp_path / "functions.json"))) == 10
    train = make_tasks("function", split="train", n=3, path=str(tmp_path / "functions.json"))
    assert len(train) == 3
    generated = make_tasks("function", split="test", n=4, level=2, seed=5)
    assert generated == generate_tasks(4, 2, 5, split="test")
    with pytest.raises(ValueError, match="split"):
        make_tasks("function", split="dev", n=1)
    with pytest.raises(ValueError, match="n:"):
        make_tasks("function", split="train")
    with pytest.raises(ValueError, match="unknown gym"):
        make_gym("nope")
