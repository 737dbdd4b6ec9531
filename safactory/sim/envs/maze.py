"""`maze`: a long-horizon text gridworld, its task generator and a shortest-path expert.

The agent `A` walks to the goal `G` through a walled grid (`#` wall, `.` free),
one square per move. A move is either a tool call `move(direction)` or an
assistant message whose whole content is `up`, `down`, `left` or `right`; any
other action gets an error observation. Bumping into a wall is a no-op with an
observation saying so.

Reward: every move costs `STEP_COST`, and a turn without a valid move (a
malformed action, an unknown tool) costs as much as one move, so stalling never
pays better than walking; reaching the goal adds `GOAL_REWARD` and ends the
episode. An optimal walk of length L therefore earns `GOAL_REWARD - L * STEP_COST`.

Layouts are perfect mazes carved by a seeded depth-first search on an odd-sized
grid, with a few extra openings (`loops`) so that shortest paths matter. The
layout, start, goal and the BFS-optimal path length live in `Task.data`. With
`partial=True` the agent sees only a window of `view_radius` squares around it
plus its coordinates; the goal's coordinates are stated in the opening message.
Train and test splits are disjoint by a hash of (layout, start, goal).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.env import EnvEntry, EnvRegistry, EnvSpec, ToolEnvironment, ToolError, draw_tasks
from safactory.types import Message, StepResult, Task, ToolCall, ToolSpec, canonical_json

ENV_ID = "maze"
VERSION = "1"

Pos = tuple[int, int]

DIRECTIONS: dict[str, Pos] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
MIN_SIZE = 5
MAX_SIZE = 15
STEP_COST = 0.01
GOAL_REWARD = 1.0
# A shortest path never exceeds the tree path of the carved maze, which visits at most all
# (k*k cells + k*k-1 passages) open squares of a MAX_SIZE grid, k = (MAX_SIZE - 1) // 2.
MAX_OPTIMAL = 2 * ((MAX_SIZE - 1) // 2) ** 2 - 2
MAX_TURNS = 4 * MAX_OPTIMAL

MOVE = ToolSpec(
    name="move",
    description="Move one square: up, down, left or right. A plain reply `up` (etc.) does the same.",
    parameters={
        "type": "object",
        "properties": {"direction": {"type": "string", "enum": list(DIRECTIONS)}},
        "required": ["direction"],
    },
)
SPEC = EnvSpec(
    id=ENV_ID,
    version=VERSION,
    tools=(MOVE,),
    max_turns=MAX_TURNS,
    description="Walk A to G through a text maze, one move per turn: up/down/left/right or move(direction).",
    reusable=True,  # on_reset rebuilds all of the episode's state
)

_HOW = "Each turn reply up, down, left or right (or call move(direction))."


# ---- layouts -------------------------------------------------------------------------


def carve(size: int, rng: random.Random, loops: float) -> list[str]:
    """A size x size maze: cells on odd coordinates joined by a random spanning tree, plus extra openings.

    `loops` is the chance that a dead end gets one more opening to a neighbouring cell.
    """
    k = (size - 1) // 2
    grid = [["#"] * size for _ in range(size)]
    first = (rng.randrange(k), rng.randrange(k))
    grid[2 * first[0] + 1][2 * first[1] + 1] = "."
    visited = {first}
    stack = [first]
    while stack:
        r, c = stack[-1]
        fresh = [n for n in _cell_neighbours(r, c, k) if n not in visited]
        if not fresh:
            stack.pop()
            continue
        nr, nc = rng.choice(fresh)
        grid[r + nr + 1][c + nc + 1] = "."
        grid[2 * nr + 1][2 * nc + 1] = "."
        visited.add((nr, nc))
        stack.append((nr, nc))
    for r in range(k):
        for c in range(k):
            closed = [(nr, nc) for nr, nc in _cell_neighbours(r, c, k) if grid[r + nr + 1][c + nc + 1] == "#"]
            dead_end = len(closed) == len(_cell_neighbours(r, c, k)) - 1
            if dead_end and closed and rng.random() < loops:
                nr, nc = rng.choice(closed)
                grid[r + nr + 1][c + nc + 1] = "."
    return ["".join(row) for row in grid]


def _cell_neighbours(r: int, c: int, k: int) -> list[Pos]:
    return [(r + dr, c + dc) for dr, dc in DIRECTIONS.values() if 0 <= r + dr < k and 0 <= c + dc < k]


def _pos(value: Any) -> Pos:
    return (int(value[0]), int(value[1]))


def is_free(grid: list[str], pos: Pos) -> bool:
    r, c = pos
    return 0 <= r < len(grid) and 0 <= c < len(grid[r]) and grid[r][c] != "#"


def bfs(grid: list[str], source: Pos) -> dict[Pos, int]:
    """Shortest move counts from `source` to every reachable free square."""
    dist = {source: 0}
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for dr, dc in DIRECTIONS.values():
            nxt = (r + dr, c + dc)
            if nxt not in dist and is_free(grid, nxt):
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return dist


def shortest_path(grid: list[str], source: Pos, target: Pos) -> list[str]:
    """Directions of one shortest walk from source to target (BFS from the target, then descend)."""
    dist = bfs(grid, target)
    if source not in dist:
        raise ValueError(f"{target} is not reachable from {source}")
    path: list[str] = []
    pos = source
    while pos != target:
        for name, (dr, dc) in DIRECTIONS.items():
            nxt = (pos[0] + dr, pos[1] + dc)
            if dist.get(nxt, -1) == dist[pos] - 1:
                path.append(name)
                pos = nxt
                break
    return path


def layout_split(grid: list[str], start: Pos, goal: Pos, test_percent: int = 20) -> str:
    """Deterministic split of a (layout, start, goal): 'test' for about test_percent% of them."""
    key = canonical_json({"grid": grid, "start": list(start), "goal": list(goal)})
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if digest[0] % 100 < test_percent else "train"


# ---- rendering -----------------------------------------------------------------------


def render(grid: list[str], agent: Pos, goal: Pos, radius: int | None = None) -> str:
    """The grid with A and G drawn in; with `radius`, only the window around the agent (outside is #)."""
    if radius is None:
        rows, cols = range(len(grid)), range(len(grid[0]))
    else:
        rows = range(agent[0] - radius, agent[0] + radius + 1)
        cols = range(agent[1] - radius, agent[1] + radius + 1)
    lines = []
    for r in rows:
        line = []
        for c in cols:
            if (r, c) == agent:
                line.append("A")
            elif (r, c) == goal:
                line.append("G")
            elif 0 <= r < len(grid) and 0 <= c < len(grid[r]):
                line.append(grid[r][c])
            else:
                line.append("#")
        lines.append("".join(line))
    return "\n".join(lines)


def _radius(data: dict[str, Any]) -> int | None:
    return int(data["view_radius"]) if data.get("partial") else None


def intro(data: dict[str, Any]) -> str:
    """The opening message of a task: instructions and the first view."""
    size, start, goal = data["size"], _pos(data["start"]), _pos(data["goal"])
    view = render(data["grid"], start, goal, _radius(data))
    if not data.get("partial"):
        return f"Maze {size}x{size}. Walk A to G; # is a wall. {_HOW}\n{view}"
    return (
        f"Maze {size}x{size}, you see {data['view_radius']} squares around you. Walk A to G at row {goal[0]}, "
        f"col {goal[1]} (row 0 is the top, col 0 the left); # is a wall. {_HOW}\nat {start[0]},{start[1]}\n{view}"
    )


# ---- tasks ---------------------------------------------------------------------------


@dataclass
class MazeTasks:
    """Seeded generator of maze tasks.

    Sizes are odd, MIN_SIZE..MAX_SIZE; each task draws one. The goal is a cell far from
    a random cell, and the start a cell at least `far` times the goal's eccentricity away
    from it, so paths are long (from the seed-1234 generator: about 30 moves on average at
    11x11, and never under 20 from 13x13 up). `partial` and
    `view_radius` choose partial observability (stored per task).
    """

    seed: int = 1234
    sizes: tuple[int, ...] = (5, 7, 9, 11, 13, 15)
    loops: float = 0.1
    far: float = 0.75
    partial: bool = False
    view_radius: int = 2
    test_percent: int = 20

    def __post_init__(self) -> None:
        self.sizes = tuple(int(s) for s in self.sizes)
        bad = [s for s in self.sizes if s % 2 == 0 or not MIN_SIZE <= s <= MAX_SIZE]
        if not self.sizes or bad:
            raise ValueError(f"maze sizes must be odd numbers in [{MIN_SIZE}, {MAX_SIZE}], got {self.sizes}")
        if self.view_radius < 1:
            raise ValueError("view_radius must be at least 1")
        if not 0.0 <= self.loops <= 1.0 or not 0.0 <= self.far <= 1.0:
            raise ValueError("loops and far must lie in [0, 1]")

    def layout(self, rng: random.Random) -> dict[str, Any]:
        size = rng.choice(self.sizes)
        grid = carve(size, rng, self.loops)
        cells = [(r, c) for r in range(1, size, 2) for c in range(1, size, 2)]
        dist_a = bfs(grid, rng.choice(cells))
        farthest = max(dist_a[c] for c in cells)
        goal = rng.choice([c for c in cells if dist_a[c] == farthest])
        dist_g = bfs(grid, goal)
        reach = max(dist_g[c] for c in cells)
        start = rng.choice([c for c in cells if dist_g[c] >= max(1, round(self.far * reach))])
        return {
            "size": size,
            "grid": grid,
            "start": list(start),
            "goal": list(goal),
            "optimal": dist_g[start],
            "partial": self.partial,
            "view_radius": self.view_radius,
        }

    def tasks(self, split: str, n: int) -> list[Task]:
        def propose(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
            data = self.layout(rng)
            start, goal = _pos(data["start"]), _pos(data["goal"])
            key = canonical_json([data["grid"], data["start"], data["goal"]])
            return key, layout_split(data["grid"], start, goal, self.test_percent), data

        def build(rng: random.Random, data: dict[str, Any], index: int) -> Task:
            return Task(id=f"{ENV_ID}/{split}/{index}", env_id=ENV_ID, split=split, prompt=intro(data), data=data)

        return draw_tasks(SPEC, split, n, self.seed, propose, build)


# ---- environment ---------------------------------------------------------------------


def plain_direction(action: Message) -> str | None:
    """The direction of a plain action (content exactly up/down/left/right, no tool call), else None."""
    if action.tool_calls:
        return None
    word = action.content.strip().lower()
    return word if word in DIRECTIONS else None


class MazeEnv(ToolEnvironment):
    """One maze episode. State: the layout, the agent's square, the move count."""

    spec = SPEC

    def __init__(self) -> None:
        super().__init__()
        self.grid: list[str] = []
        self.pos: Pos = (0, 0)
        self.goal: Pos = (0, 0)
        self.radius: int | None = None
        self.moves = 0
        self._turn_moves = 0

    async def on_reset(self, task: Task) -> list[Message]:
        data = task.data
        self.grid = list(data["grid"])
        self.pos = _pos(data["start"])
        self.goal = _pos(data["goal"])
        self.radius = _radius(data)
        self.moves = 0
        return [Message(role="user", content=intro(data))]

    def view(self, status: str) -> str:
        if self.radius is None:
            return f"{status}\n{render(self.grid, self.pos, self.goal)}"
        return f"{status}; at {self.pos[0]},{self.pos[1]}\n{render(self.grid, self.pos, self.goal, self.radius)}"

    def _move(self, direction: str) -> str:
        self.moves += 1
        self._turn_moves += 1
        dr, dc = DIRECTIONS[direction]
        target = (self.pos[0] + dr, self.pos[1] + dc)
        if not is_free(self.grid, target):
            return self.view(f"wall: cannot move {direction}")
        self.pos = target
        if self.pos == self.goal:
            self.done = True
            return self.view(f"goal reached in {self.moves} moves")
        return self.view(f"moved {direction}")

    def tool_move(self, direction: str) -> str:
        word = str(direction).strip().lower()
        if word not in DIRECTIONS:
            raise ToolError(f"unknown direction {str(direction)[:20]!r}; use up, down, left or right")
        return self._move(word)

    def _end_info(self, success: bool) -> dict[str, Any]:
        assert self.task is not None
        return {"success": success, "moves": self.moves, "optimal": self.task.data["optimal"]}

    async def step(self, action: Message) -> StepResult:
        if (over := self.begin_step()) is not None:
            return over
        self._turn_moves = 0
        errors: list[str] = []
        messages: list[Message] = []
        direction = plain_direction(action)
        if direction is not None:
            messages.append(Message(role="user", content=self._move(direction)))
        elif not action.tool_calls:
            errors.append("no move")
            messages.append(Message(role="user", content=f"error: not a move. {_HOW}"))
        for call in action.tool_calls:
            if self.done:
                break
            text = await self._dispatch(call, errors)
            messages.append(Message(role="tool", content=text, tool_call_id=call.id, name=call.name))
        reward = -STEP_COST * max(1, self._turn_moves)
        info: dict[str, Any] = {"errors": errors} if errors else {}
        if self.done:
            info.update(self._end_info(True))
            return StepResult(messages=messages, reward=reward + GOAL_REWARD, terminated=True, info=info)
        truncated = self.turn >= self.spec.max_turns
        if truncated:
            info.update(self._end_info(False))
        return StepResult(messages=messages, reward=reward, truncated=truncated, info=info)


# ---- expert --------------------------------------------------------------------------

_GRID_LINE = re.compile(r"[#.AG]+")
_AT = re.compile(r"\bat (\d+),(\d+)\s*$")
_GOAL_AT = re.compile(r"G at row (\d+), col (\d+)")
_SIZE = re.compile(r"Maze (\d+)x(\d+)")


def _grid_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _GRID_LINE.fullmatch(line)]


def _find(lines: list[str], char: str) -> Pos | None:
    for r, line in enumerate(lines):
        if char in line:
            return (r, line.index(char))
    return None


class MazeExpert:
    """Scripted expert: walks a BFS shortest path, reading only the conversation.

    With full observability it parses the grid from the opening message and the
    agent's square from the latest view, and takes the first step of a shortest
    path, so it walks an optimal path. The Policy protocol gives an expert only
    the messages, not `Task.data`, so with partial observability it cannot use the
    hidden layout: it remembers every window it has seen and, each turn, takes the
    first step of a BFS shortest path on that map treating unseen squares as free.
    That always reaches the goal (every detour reveals a wall it will not try
    again), though not always in the optimal number of moves.

    It speaks the plain-text tool protocol (`move(up)`); with `plain=True` it
    answers with the bare direction instead. It keeps no state between calls.
    """

    version = 0

    def __init__(self, plain: bool = False) -> None:
        self.plain = plain

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        direction = self.next_move(messages)
        if self.plain:
            return Completion(text=direction, policy_version=self.version)
        call = ToolCall(id=f"call_{len(messages)}", name="move", arguments={"direction": direction})
        return Completion(text=f"move({direction})", tool_calls=[call], policy_version=self.version)

    def next_move(self, messages: list[Message]) -> str:
        opening = next(m for m in messages if m.role == "user").content
        if _GOAL_AT.search(opening):
            return self._explore(opening, messages)
        goal_map = _grid_lines(opening)
        current = next(
            (_grid_lines(m.content) for m in reversed(messages) if m.role in ("user", "tool") and "#" in m.content), []
        )
        agent, goal = _find(current, "A"), _find(goal_map, "G")
        if agent is None or goal is None:
            raise ValueError("cannot find A and G in the maze view")
        grid = [line.replace("A", ".").replace("G", ".") for line in current]
        return shortest_path(grid, agent, goal)[0]

    def _explore(self, opening: str, messages: list[Message]) -> str:
        goal_m, size_m = _GOAL_AT.search(opening), _SIZE.search(opening)
        assert goal_m is not None and size_m is not None
        goal = (int(goal_m.group(1)), int(goal_m.group(2)))
        size = int(size_m.group(1))
        known: dict[Pos, str] = {}
        agent: Pos | None = None
        for message in messages:
            if message.role not in ("user", "tool"):
                continue
            lines = message.content.splitlines()
            at = next((_AT.search(line) for line in lines if _AT.search(line)), None)
            window = _grid_lines(message.content)
            if at is None or not window:
                continue
            agent = (int(at.group(1)), int(at.group(2)))
            radius = len(window) // 2
            for dr, line in enumerate(window):
                for dc, char in enumerate(line):
                    known[(agent[0] - radius + dr, agent[1] - radius + dc)] = char
        if agent is None:
            raise ValueError("cannot find the agent's position in the conversation")
        grid = [
            "".join("#" if known.get((r, c)) == "#" else "." for c in range(size)) for r in range(size)
        ]  # unseen squares count as free
        return shortest_path(grid, agent, goal)[0]


def register(registry: EnvRegistry) -> None:
    """Register this environment with a registry."""
    registry.register(ENV_ID, EnvEntry(factory=MazeEnv, tasks=MazeTasks, expert=MazeExpert, spec=SPEC))
