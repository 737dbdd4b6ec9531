"""`arith`: multi-turn arithmetic with a calculator tool.

The task states an expression (as symbols or in words). Tools: `calc(expression)`
returns its value or an error, `answer(value)` ends the episode with reward 1.0 when
the value is right. Train and test splits are disjoint by construction: an
expression belongs to the test split when its hash says so, so the held-out split
holds expressions never seen in training, drawn from the same distribution.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
import re
import warnings
from dataclasses import dataclass

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.env import EnvSpec, ToolEnvironment, ToolError, draw_tasks
from safactory.types import Message, Task, ToolCall, ToolSpec

ENV_ID = "arith"
VERSION = "1"

CALC = ToolSpec(
    name="calc",
    description="Evaluate an arithmetic expression with + - * / and parentheses.",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 12+7*3"}},
        "required": ["expression"],
    },
    read_only=True,
)
ANSWER = ToolSpec(
    name="answer",
    description="Submit the final numeric answer; ends the episode.",
    parameters={
        "type": "object",
        "properties": {"value": {"type": "string", "description": "the final number"}},
        "required": ["value"],
    },
)
SPEC = EnvSpec(
    id=ENV_ID,
    version=VERSION,
    tools=(CALC, ANSWER),
    max_turns=4,
    description="State an arithmetic expression; solve it with calc(...) then answer(...).",
    reusable=True,  # on_reset rebuilds all of the episode's state
)

_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_TEMPLATES = ("Compute {sym}.", "What is {spaced}?", "Evaluate {words}.")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expression: str) -> float:
    """Evaluate + - * / on numbers and parentheses only; raises ToolError otherwise."""
    if len(expression) > 200:
        raise ToolError("expression too long")
    try:
        with warnings.catch_warnings():  # model text such as "1a" makes the parser warn on stderr
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"bad expression {expression!r}") from None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ToolError("division by zero")
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 1e15:
                raise ToolError("number too large")
            return _BINOPS[type(node.op)](left, right)
        raise ToolError(f"bad expression {expression!r}")

    return ev(tree)


def format_number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def expression_split(expression: str, test_percent: int = 20) -> str:
    """Deterministic split of an expression: 'test' for about test_percent% of them."""
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if digest[0] % 100 < test_percent else "train"


@dataclass
class ArithTasks:
    """Seeded generator of arith tasks. Operands in [0, max_operand], 2..max_operands of them."""

    seed: int = 1234
    max_operand: int = 99
    max_operands: int = 3
    test_percent: int = 20

    def expression(self, rng: random.Random) -> str:
        n = rng.randint(2, self.max_operands)
        parts = [str(rng.randint(0, self.max_operand))]
        for _ in range(n - 1):
            parts += [rng.choice("+-*"), str(rng.randint(0, self.max_operand))]
        return "".join(parts)

    def tasks(self, split: str, n: int) -> list[Task]:
        def propose(rng: random.Random) -> tuple[str, str, str]:
            expr = self.expression(rng)
            return expr, expression_split(expr, self.test_percent), expr

        def build(rng: random.Random, expr: str, index: int) -> Task:
            template = rng.choice(_TEMPLATES)
            return Task(
                id=f"{ENV_ID}/{split}/{index}",
                env_id=ENV_ID,
                split=split,
                prompt=template.format(sym=expr, spaced=_spaced(expr), words=_words(expr)),
                data={"expression": expr, "answer": format_number(safe_eval(expr))},
            )

        return draw_tasks(SPEC, split, n, self.seed, propose, build)


def _tokens(expr: str) -> list[str]:
    return re.findall(r"\d+|[+\-*]", expr)


def _spaced(expr: str) -> str:
    return " ".join(_tokens(expr))


def _words(expr: str) -> str:
    return " ".join(_WORDS.get(tok, tok) for tok in _tokens(expr))


class ArithEnv(ToolEnvironment):
    spec = SPEC

    async def on_reset(self, task: Task) -> list[Message]:
        try:
            float(task.data["answer"])
        except (KeyError, TypeError, ValueError, OverflowError):  # a task made elsewhere: refused now, not mid-episode
            raise ValueError(f"an arith task needs data.answer, a number; task {task.id[:100]!r} has none") from None
        return [Message(role="user", content=task.prompt)]

    def tool_calc(self, expression: str) -> str:
        return format_number(safe_eval(str(expression)))

    def tool_answer(self, value: str) -> str:
        assert self.task is not None
        try:
            given = float(str(value).strip())
        except ValueError:
            self.finish(0.0, {"success": False, "answer": str(value)})
            return f"wrong: {value!r} is not a number"
        correct = abs(given - float(self.task.data["answer"])) < 1e-6
        self.finish(1.0 if correct else 0.0, {"success": correct, "answer": str(value)})
        return "correct" if correct else "wrong"


_WORD_TO_SYM = {w: s for s, w in _WORDS.items()}


def prompt_expression(prompt: str) -> str:
    """Recover the expression from any of the task templates (what the expert reads)."""
    body = re.sub(r"^(Compute|What is|Evaluate)\s+", "", prompt.strip()).rstrip(".?")
    return "".join(_WORD_TO_SYM.get(tok, tok) for tok in body.split())


class ArithExpert:
    """Scripted expert: calc the stated expression, then answer with the result.

    It speaks the plain-text tool protocol (`calc(12+3)`), so its turns render the
    same way a model's do.
    """

    version = 0

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        last = messages[-1]
        if last.role == "tool" and last.name == "calc" and not last.content.startswith("error"):
            name, arg = "answer", last.content
        else:
            task = next(m for m in messages if m.role == "user")
            name, arg = "calc", prompt_expression(task.content)
        key = "value" if name == "answer" else "expression"
        call = ToolCall(id=f"call_{len(messages)}", name=name, arguments={key: arg})
        return Completion(text=f"{name}({arg})", tool_calls=[call], policy_version=self.version)
