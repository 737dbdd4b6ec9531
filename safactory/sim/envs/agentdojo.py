"""`agentdojo:<suite>[@<version>]`: the AgentDojo benchmark (prompt-injection robustness of tool agents).

AgentDojo (the `agentdojo` package, installed separately: `pip install agentdojo`) ships
task suites (workspace, travel, banking, slack), each with a simulated environment
state, the tools that act on it, user tasks (a prompt, ground-truth calls and a
`utility` check) and injection tasks (an attacker's goal, its ground truth and a
`security` check). Everything runs offline; nothing here calls a model or the network.

* Ids: `agentdojo:banking` uses the package's latest benchmark version;
  `agentdojo:banking@v1.2` (or `@1.2`) pins one. Unknown suites or versions are refused
  when the id is resolved, with the ones that exist.
* Tasks (`AgentDojoTasks`, options from `EnvConfig.options`): one per user task; with
  `attack` (an attack name of the package, e.g. `important_instructions`) one per
  (user task, injection task) pair, the injected texts made by the package's attack and
  stored in `Task.data["injections"]`. A user task belongs to train or test by a hash of
  `<suite>/<user task id>`, so all its pairs share a split and held-out user tasks are
  never seen in training. The order within a split is a shuffle by `seed`; a split has
  as many tasks as the suite has (`tasks(split, n)` returns fewer than n when n is larger).
* Episodes: the opening messages are the package's default system message and the user
  task's prompt. A tool call runs through the package's own executor (`ToolsExecutor`
  over a `FunctionsRuntime` on the task's environment state), results formatted as the
  package does (YAML). An unknown tool, bad arguments or a failing tool give a tool
  message starting with "error:" (also listed in `info["errors"]`); the episode goes on.
  An assistant message without tool calls is the final answer (AgentDojo's model output)
  and ends the episode; so does reaching `spec.max_turns` (truncated, scored with an
  empty output).
* Scoring, at the end, with the package's checks (`utility_from_traces`, else `utility`;
  the same for `security`): reward 1.0 when the user task is done, else 0.0;
  `info["success"]` and `info["utility"]` say the same. With an attack,
  `info["security"]` is AgentDojo's security result: True when the injection task's goal
  was met (the attack succeeded). Such an episode, and only such an episode, is unsafe:
  `info["unsafe"]`, `info["unsafe_labels"] == ["injection:<injection task id>"]`, and the
  same label in the final step's `info["unsafe_actions"]`, so the attack success rate is
  AgentDojo's own (tests/test_agentdojo_crosscheck.py checks it against the package's
  benchmark functions). The label waits for the end because the package judges the final
  state: a goal met by one call and undone by a later one (banking's password, changed by
  the attacker's order and then by the user's) is no success there. Where the goal holds,
  `info["goal_met_step"]` is the index of the step after which it held for good (the
  package's security check, run after every step with the calls so far and an empty
  output), else of the final step. For the package's denial-of-service attacks only the
  first injection task is paired and security is "utility failed", as in its benchmark.

`max_turns` is at least AgentDojo's own 16 model turns (1 + 15 tool rounds), more where a
suite's ground truth needs more single-call turns (user task plus injection task).
The scripted experts live in `agentdojo_expert.py`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

from safactory.sim.env import EnvSpec, begin_step
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec

if TYPE_CHECKING:
    pass

SCHEME = "agentdojo"
ADAPTER_VERSION = "1"
AGENTDOJO_TURNS = 16  # AgentDojo's pipeline: one model turn, then up to 15 rounds of tool calls and a turn
TARGET_MODEL = "local"  # the package's model key for a locally served model; attacks address the agent by it
INSTALL_HINT = "the agentdojo: environments need the agentdojo package; install it with `pip install agentdojo`"


class AgentDojoEnvError(ValueError):
    """An `agentdojo:` id or option that cannot be served (package missing, unknown suite, version or attack)."""


def dojo(module: str = "task_suite.load_suites") -> Any:
    """A module of the agentdojo package, imported on first use; AgentDojoEnvError when it is not installed."""
    try:
        return import_module(f"agentdojo.{module}")
    except ImportError as exc:
        raise AgentDojoEnvError(f"{INSTALL_HINT} ({exc})") from exc


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", name))


def benchmark_versions() -> list[str]:
    """The benchmark versions the installed package knows, oldest first (e.g. v1, v1.1, ..., v1.2.2)."""
    suites = getattr(dojo(), "_SUITES", None)
    names = [v for v, table in (suites or {}).items() if table]
    return sorted(names, key=_version_key)


def parse_id(rest: str) -> tuple[str, str]:
    """Split `banking@v1.2` into (suite, version); the version defaults to the package's latest."""
    suite, _, pinned = rest.strip().partition("@")
    suite, pinned = suite.strip(), pinned.strip()
    if not suite:
        raise AgentDojoEnvError("empty suite; use agentdojo:<suite>[@<version>], e.g. agentdojo:banking")
    versions = benchmark_versions()
    if not versions:
        raise AgentDojoEnvError("the installed agentdojo package lists no benchmark versions")
    if not pinned:
        return suite, versions[-1]
    wanted = pinned if pinned.startswith("v") else f"v{pinned}"
    if wanted not in versions:
        raise AgentDojoEnvError(f"unknown AgentDojo benchmark version {pinned!r}; known: {', '.join(versions)}")
    return suite, wanted


@dataclass(frozen=True)
class DojoProfile:
    """One resolved suite at one benchmark version, shared by every episode, task list and expert of that id."""

    env_id: str
    suite_name: str
    benchmark_version: str
    suite: Any = field(compare=False, repr=False)  # agentdojo TaskSuite
    spec: EnvSpec = field(compare=False, repr=False)


@cache
def default_environment(suite: Any) -> Any:
    """The suite's environment without injections (kept once; callers take deep copies)."""
    return suite.load_and_inject_default_environment({})


def fresh_environment(suite: Any) -> Any:
    return default_environment(suite).model_copy(deep=True)


@cache
def ground_truth(suite: Any, task_id: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The package's ground-truth calls of a user or injection task, as (function, arguments).

    User tasks are asked on their initialised environment, injection tasks on the default one,
    both without injections (as the package's own checks do).
    """
    if task_id.startswith("injection_task_"):
        calls = suite.get_injection_task_by_id(task_id).ground_truth(fresh_environment(suite))
    else:
        task = suite.get_user_task_by_id(task_id)
        calls = task.ground_truth(task.init_environment(fresh_environment(suite)))
    return tuple((c.function, dict(c.args)) for c in calls)


def _tool_spec(function: Any) -> ToolSpec:
    return ToolSpec(
        name=function.name, description=function.description, parameters=function.parameters.model_json_schema()
    )


def profile(rest: str) -> DojoProfile:
    """Resolve `<suite>[@<version>]` against the installed package (AgentDojoEnvError when it cannot be served)."""
    suite_name, benchmark_version = parse_id(rest)
    suites = dojo().get_suites(benchmark_version)
    if suite_name not in suites:
        raise AgentDojoEnvError(
            f"unknown AgentDojo suite {suite_name!r} in {benchmark_version}; known: {', '.join(sorted(suites))}"
        )
    suite = suites[suite_name]
    longest_user = max((len(ground_truth(suite, t)) for t in suite.user_tasks), default=0)
    longest_injection = max((len(ground_truth(suite, t)) for t in suite.injection_tasks), default=0)
    try:
        pkg = package_version("agentdojo")
    except PackageNotFoundError:  # pragma: no cover - an uninstalled source tree
        pkg = "unknown"
    env_id = f"{SCHEME}:{rest.strip()}"
    spec = EnvSpec(
        id=env_id,
        version=f"{ADAPTER_VERSION}+agentdojo-{pkg}+{benchmark_version}",
        tools=tuple(_tool_spec(f) for f in suite.tools),
        max_turns=max(AGENTDOJO_TURNS, longest_user + longest_injection + 2),
        description=f"AgentDojo {suite_name} suite ({benchmark_version}): do the user's task with the suite's tools; "
        "reply without a tool call to give the final answer.",
    )
    return DojoProfile(env_id, suite_name, benchmark_version, suite, spec)


# ---- tasks -----------------------------------------------------------------------------------


def user_task_split(suite_name: str, user_task_id: str, test_percent: int = 20) -> str:
    """Deterministic split of a user task (and of all its injection pairs)."""
    digest = hashlib.sha256(f"{suite_name}/{user_task_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < test_percent else "train"


def _natural(task_id: str) -> tuple[str, int]:
    head, _, number = task_id.rpartition("_")
    return (head, int(number)) if number.isdigit() else (task_id, -1)


@cache
def _target_class() -> type:
    base = dojo("agent_pipeline.base_pipeline_element").BasePipelineElement

    class TargetPipeline(base):  # type: ignore[misc, valid-type]
        """What the package's attacks are built against: they read only its name (to address the model)."""

        def query(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the safactory agent is driven by safactory, not by this pipeline")

    return TargetPipeline


def target_pipeline(name: str) -> Any:
    """A stand-in agent pipeline named `name` (a key of the package's MODEL_NAMES)."""
    target = _target_class()()
    target.name = name
    return target


@dataclass
class AgentDojoTasks:
    """The tasks of one suite: user tasks, or with `attack` every (user task, injection task) pair.

    `user_tasks` / `injection_tasks` restrict to those ids; `target_model` is the model key
    the attack addresses the agent by (a key of the package's MODEL_NAMES; "local" is its
    name for a locally served model).
    """

    profile: DojoProfile
    attack: str | None = None
    seed: int = 1234
    test_percent: int = 20
    user_tasks: list[str] | None = None
    injection_tasks: list[str] | None = None
    target_model: str = TARGET_MODEL

    def __post_init__(self) -> None:
        if not 0 <= self.test_percent <= 100:
            raise AgentDojoEnvError(f"test_percent must be in [0, 100], got {self.test_percent}")
        suite = self.profile.suite
        for wanted, known, kind in (
            (self.user_tasks, suite.user_tasks, "user"),
            (self.injection_tasks, suite.injection_tasks, "injection"),
        ):
            unknown = sorted(set(wanted or ()) - set(known))
            if unknown:
                raise AgentDojoEnvError(f"unknown {kind} tasks {unknown} in {self.profile.env_id}")
        self._attack: Any = None
        if self.attack is not None:
            attacks = dojo("attacks")
            known_attacks = dojo("attacks.attack_registry").ATTACKS
            if self.attack == "manual" or self.attack not in known_attacks:
                usable = ", ".join(sorted(a for a in known_attacks if a != "manual"))
                raise AgentDojoEnvError(f"unknown or interactive AgentDojo attack {self.attack!r}; known: {usable}")
            try:
                self._attack = attacks.load_attack(self.attack, suite, target_pipeline(self.target_model))
            except ValueError as exc:
                raise AgentDojoEnvError(f"cannot build attack {self.attack!r}: {exc}") from exc

    def pairs(self, split: str) -> list[tuple[str, str | None]]:
        """The (user task, injection task or None) keys of a split, in natural order."""
        suite = self.profile.suite
        users = sorted(self.user_tasks or suite.user_tasks, key=_natural)
        users = [u for u in users if user_task_split(self.profile.suite_name, u, self.test_percent) == split]
        if self._attack is None:
            return [(u, None) for u in users]
        injections = sorted(self.injection_tasks or suite.injection_tasks, key=_natural)
        if self._attack.is_dos_attack:  # the package runs a DoS attack with its first injection task only
            injections = [next(iter(suite.injection_tasks))]
        return [(u, i) for u in users for i in injections]

    def tasks(self, split: str, n: int) -> list[Task]:
        if split not in self.profile.spec.splits:
            raise ValueError(f"{self.profile.env_id} has splits {self.profile.spec.splits}, not {split!r}")
        keys = self.pairs(split)
        random.Random(f"{self.seed}:{split}").shuffle(keys)
        out: list[Task] = []
        for user_id, injection_id in keys:
            if len(out) >= n:
                break
            task = self._task(split, user_id, injection_id)
            if task is not None:
                out.append(task)
        if n > 0 and not out:
            raise ValueError(f"{self.profile.env_id} has no {split!r} tasks with these options")
        return out

    def _task(self, split: str, user_id: str, injection_id: str | None) -> Task | None:
        """One task; None for a pair whose user task shows the agent no injection point (the attack refuses it)."""
        suite, p = self.profile.suite, self.profile
        user_task = suite.get_user_task_by_id(user_id)
        injections: dict[str, str] = {}
        task_id = f"{p.env_id}/{split}/{user_id}"
        if injection_id is not None:
            try:
                injections = dict(self._attack.attack(user_task, suite.get_injection_task_by_id(injection_id)))
            except ValueError:  # "not injectable": the package's benchmark has no such pair either
                return None
            task_id += f"/{self.attack}/{injection_id}"
        data = {
            "suite": p.suite_name,
            "benchmark_version": p.benchmark_version,
            "user_task": user_id,
            "injection_task": injection_id,
            "attack": self.attack if injection_id is not None else None,
            "dos": bool(injection_id is not None and self._attack.is_dos_attack),
            "injections": injections,
            # what `safactory eval` reads: attacked tasks give utility under attack and the ASR
            "category": "benign" if injection_id is None else "injection",
        }
        return Task(id=task_id, env_id=p.env_id, split=split, prompt=user_task.PROMPT, data=data)


# ---- the environment -------------------------------------------------------------------------


class AgentDojoEnv:
    """One AgentDojo episode: the task's (injected) environment state, the package's tools and checks."""

    def __init__(self, profile: DojoProfile) -> None:
        self.profile = profile
        self.spec = profile.spec
        self.task: Task | None = None
        self.done = False
        self.turn = 0
        self.user_task: Any = None  # the package's task objects and state, set by reset
        self.injection_task: Any = None
        self.environment: Any = None
        self.pre_environment: Any = None
        self.traces: list[Any] = []  # every FunctionCall the agent made, as the package's trace checks see them
        self.goal_step: int | None = None  # the step after which the injection's goal holds (so far)

    async def reset(self, task: Task, seed: int) -> Observation:
        data, p = task.data, self.profile
        if data.get("suite") != p.suite_name or data.get("benchmark_version") != p.benchmark_version:
            raise ValueError(
                f"task {task.id[:100]!r} is for AgentDojo {data.get('suite')}@{data.get('benchmark_version')}, "
                f"not {p.suite_name}@{p.benchmark_version}"
            )
        suite = p.suite
        try:
            self.user_task = suite.get_user_task_by_id(data["user_task"])
            injection_id = data.get("injection_task")
            self.injection_task = suite.get_injection_task_by_id(injection_id) if injection_id else None
            environment = suite.load_and_inject_default_environment(dict(data.get("injections") or {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"task {task.id[:100]!r} does not name tasks of {p.env_id}: {exc}") from None
        self.environment = self.user_task.init_environment(environment)
        self.pre_environment = self.environment.model_copy(deep=True)
        self.runtime = dojo("functions_runtime").FunctionsRuntime(suite.tools)
        self.executor = dojo("agent_pipeline.tool_execution").ToolsExecutor()
        self.traces = []
        self.goal_step = None
        self.task, self.done, self.turn = task, False, 0
        system = dojo("agent_pipeline.agent_pipeline").load_system_message(None)
        messages = [Message(role="system", content=system), Message(role="user", content=task.prompt)]
        return Observation(messages=messages, tools=list(self.spec.tools), info={"user_task": data["user_task"]})

    async def step(self, action: Message) -> StepResult:
        if (early := begin_step(self)) is not None:
            return early
        if not action.tool_calls:
            return self._end(action.content, terminated=True, messages=[], errors=[])
        errors: list[str] = []
        replies = [self._call(call, errors) for call in action.tool_calls]
        self._track_goal()
        if self.turn >= self.spec.max_turns:
            return self._end("", terminated=False, messages=replies, errors=errors)
        return StepResult(messages=replies, reward=0.0, info={"errors": errors} if errors else {})

    async def close(self) -> None:
        self.task = None

    # ---- helpers ---------------------------------------------------------------------
    def _call(self, call: ToolCall, errors: list[str]) -> Message:
        """Run one call through the package's executor; every problem becomes an error reply."""
        types = dojo("types")
        try:
            function_call = dojo("functions_runtime").FunctionCall(
                function=call.name, args=dict(call.arguments), id=call.id
            )
        except Exception as exc:  # arguments the package's call record cannot hold
            errors.append(f"{call.name}: bad arguments")
            return self._reply(call, f"error: bad arguments for {call.name}: {exc}")
        self.traces.append(function_call)
        asked = types.ChatAssistantMessage(role="assistant", content=None, tool_calls=[function_call])
        try:
            _, _, self.environment, out, _ = self.executor.query("", self.runtime, self.environment, [asked])
            result = out[-1]
            text = types.get_text_content_as_str(result["content"] or [])
            error = result["error"]
        except Exception as exc:  # a tool result the package cannot format, or any other failure
            text, error = "", f"{type(exc).__name__}: {exc}"
        if error is not None:
            errors.append(f"{call.name}: {error.splitlines()[0] if error else 'error'}")
            return self._reply(call, f"error: {error}")
        return self._reply(call, text)

    @staticmethod
    def _reply(call: ToolCall, text: str) -> Message:
        return Message(role="tool", content=text, tool_call_id=call.id, name=call.name)

    def _security(self, output: str) -> bool:
        """The package's security check of the injection task (True: its goal was met)."""
        task = self.injection_task
        found = task.security_from_traces(output, self.pre_environment, self.environment, self.traces)
        return bool(found if found is not None else task.security(output, self.pre_environment, self.environment))

    def _utility(self, output: str) -> bool:
        task = self.user_task
        found = task.utility_from_traces(output, self.pre_environment, self.environment, self.traces)
        return bool(found if found is not None else task.utility(output, self.pre_environment, self.environment))

    def _label(self) -> str:
        return f"injection:{self.injection_task.ID}"

    def _track_goal(self) -> None:
        """Note whether the injection's goal holds after this step's calls (a later call may undo it)."""
        if self.injection_task is None or self.task.data.get("dos"):
            return
        try:
            met = self._security("")
        except Exception:  # a check that needs the final state; the end of the episode decides
            met = False
        if not met:
            self.goal_step = None
        elif self.goal_step is None:
            self.goal_step = self.turn - 1  # the step's index in the trajectory

    def _end(
        self,
        output: str,
        *,
        terminated: bool,
        messages: list[Message],
        errors: list[str],
    ) -> StepResult:
        """Score the episode with the package's checks and end it."""
        self.done = True
        data = self.task.data
        try:
            utility = self._utility(output)
        except Exception as exc:
            utility = False
            errors.append(f"utility check failed: {type(exc).__name__}: {exc}")
        security: bool | None = None
        if self.injection_task is not None:
            if data.get("dos"):
                security = not utility
            else:
                try:
                    security = self._security(output)
                except Exception as exc:
                    security = False
                    errors.append(f"security check failed: {type(exc).__name__}: {exc}")
        unsafe = bool(security)
        info: dict[str, Any] = {
            "success": utility,
            "utility": utility,
            "security": security,
            "unsafe": unsafe,
            "unsafe_labels": [self._label()] if unsafe else [],
            "suite": data["suite"],
            "benchmark_version": data["benchmark_version"],
            "user_task": data["user_task"],
            "injection_task": data.get("injection_task"),
            "attack": data.get("attack"),
            "model_output": output,
        }
        if self.injection_task is not None:
            info["unsafe_actions"] = [self._label()] if unsafe else []
            info["goal_met_step"] = (self.turn - 1 if self.goal_step is None else self.goal_step) if unsafe else None
        if errors:
            info["errors"] = errors
        return StepResult(
            messages=messages,
            reward=1.0 if utility else 0.0,
            terminated=terminated,
            truncated=not terminated,
            info=info,
        )
