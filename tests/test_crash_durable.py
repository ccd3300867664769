"""Durable workflows across SIGKILL and restart: real processes, a real ``redis-server``.

Two tests, each with child programs under ``tests/crash_programs/``:

- Human in the loop (``hitl.py``): a step with a side effect, then
  ``wait_for_event("approval")``, then the process is SIGKILLed while it
  waits, the event is raised from another process, and a fresh process
  resumes the run. The side effect happened exactly once: the resumed
  process re-runs the workflow code, but the recorded step is replayed,
  not run again (before the wait, and while it waits).
- Random kills (``durable_crash.py``): steps, a durable ``ctx.sleep`` and an
  event wait; the process is SIGKILLed at seeded random points, the event is
  raised before the kill, between the kill and the resume, or while the
  fresh process runs; the resumed run completes with the right output, no
  step whose completion was recorded before the kill runs again, any step
  runs at most twice, and the history holds each command's events once.

The in-process regressions these kills found run on every store in
``test_durable_regressions.py`` (and ``test_durable.py``).

Every step body first appends ``"<step> <pid>"`` to a journal file and
fsyncs it, so the journal says which process ran which step how often.

Leases: the start process holds step leases of 300 ms, so the resuming
process takes over a killed step quickly. A lease can also lapse in a live
process whose event loop stalls (a loaded machine); the engine then runs
the step again in that process by design (at least once), or just records
the result it has under a new lease, and the store counts the claim. The
checks below allow such a rerun only when the store recorded the extra
claim by the killed process (seen now and then on a loaded 2-CPU machine).
The resuming process is never taken over, so its lease is long.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from anyio.abc import Process
from crash_harness import kill, last_record, read_journal, read_text, run_against_redis

from stepflow import (
    Engine,
    Event,
    EventKind,
    RedisStore,
    RunNotFoundError,
    RunStatus,
    StepStatus,
)

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = pytest.mark.redis

PROGRAMS = Path(__file__).parent / "crash_programs"
HITL = PROGRAMS / "hitl.py"
CRASH = PROGRAMS / "durable_crash.py"
START_LEASE_MS = 300
RESUME_LEASE_MS = 10_000
CHILD_TIMEOUT = 30.0


async def _history(store: RedisStore, run_id: str) -> list[Event]:
    """The run's current history; empty while the run does not exist yet."""
    try:
        return await store.read_history(run_id)
    except RunNotFoundError:
        return []


def _by_kind(history: list[Event], kind: EventKind) -> list[Event]:
    return [event for event in history if event.kind == kind]


# -- human in the loop -------------------------------------------------------------


@pytest.mark.parametrize("event_at", ["before_resume", "while_resumed_run_waits"])
async def test_hitl_side_effect_once_across_kill_and_restart(
    redis_server: RedisServer, key_prefix: str, tmp_path: Path, event_at: str
) -> None:
    url = redis_server.url
    run_id = f"hitl-{uuid.uuid4().hex[:8]}"
    journal = tmp_path / "journal"
    errors_a, out_b, errors_b = tmp_path / "a.err", tmp_path / "b.out", tmp_path / "b.err"
    store = RedisStore.from_url(url, prefix=key_prefix, check_durability=False)
    try:
        # Process A: charge, then wait for the approval until it is SIGKILLed.
        command = [sys.executable, str(HITL), "start", url, key_prefix, run_id, str(journal)]
        command.append(str(START_LEASE_MS))
        with errors_a.open("wb") as stderr:
            process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=stderr)
            async with process:
                pid_a = process.pid
                try:
                    with anyio.fail_after(CHILD_TIMEOUT):
                        while not _by_kind(await _history(store, run_id), EventKind.STEP_COMPLETED):
                            assert process.returncode is None, read_text(errors_a)
                            await anyio.sleep(0.01)
                    # The charge is recorded; A is in its wait loop now. Give it time to
                    # poll a few times: nothing may change while it waits.
                    await anyio.sleep(0.3)
                    history = await store.read_history(run_id)
                    record = await store.get_run(run_id)
                finally:
                    code_a = await kill(process)
        assert code_a == -signal.SIGKILL, (
            f"A exited {code_a} before the kill: {read_text(errors_a)}"
        )
        assert read_journal(journal) == [("charge", pid_a)]
        assert record is not None
        assert record.status == RunStatus.RUNNING
        assert [e.kind for e in history] == [EventKind.RUN_STARTED, EventKind.STEP_COMPLETED]

        approval = {"by": "alice", "note": f"ok {run_id}"}
        if event_at == "before_resume":
            # Only appends to the run's history: no process drives the run now.
            await Engine(store).raise_event(run_id, "approval", approval)

        # Process B: resume by id in a fresh process, wait for the end.
        command = [sys.executable, str(HITL), "resume", url, key_prefix, run_id]
        command.append(str(RESUME_LEASE_MS))
        with out_b.open("wb") as stdout, errors_b.open("wb") as stderr:
            process = await anyio.open_process(command, stdout=stdout, stderr=stderr)
            async with process:
                pid_b = process.pid
                try:
                    with anyio.fail_after(CHILD_TIMEOUT):
                        if event_at == "while_resumed_run_waits":
                            while "resumed" not in read_text(out_b):
                                assert process.returncode is None, read_text(errors_b)
                                await anyio.sleep(0.01)
                            # B replays the charge and waits; it must not charge again.
                            await anyio.sleep(0.5)
                            assert read_journal(journal) == [("charge", pid_a)]
                            assert await store.read_history(run_id) == history
                            await Engine(store).raise_event(run_id, "approval", approval)
                        code_b = await process.wait()
                finally:
                    await kill(process)
        assert code_b == 0, f"B failed ({code_b}): {read_text(errors_b)}"

        final = last_record(read_text(out_b))
        assert final.status == RunStatus.COMPLETED, final.error
        assert read_journal(journal) == [("charge", pid_a), ("ship", pid_b)]
        assert final.output == {
            "charged": {"line": f"charge {pid_a}", "amount": 42},  # A's result, replayed
            "approval": approval,
            "shipped": {"line": f"ship {pid_b}", "approved_by": "alice"},
        }
        stored = await store.get_run(run_id)
        assert stored is not None
        assert stored.status == RunStatus.COMPLETED
        assert stored.output == final.output

        history = await store.read_history(run_id)
        completions = _by_kind(history, EventKind.STEP_COMPLETED)
        assert [e.payload["name"] for e in completions] == ["charge", "ship"]
        (raised,) = _by_kind(history, EventKind.EVENT_RAISED)
        (received,) = _by_kind(history, EventKind.EVENT_RECEIVED)
        assert received.payload["raised_id"] == raised.event_id
        assert received.payload["payload"] == approval
        assert len(_by_kind(history, EventKind.RUN_COMPLETED)) == 1
        steps = {s.name: s for s in await store.list_steps(run_id)}
        assert {name: s.attempt for name, s in steps.items()} == {"charge": 1, "ship": 1}
        assert steps["charge"].worker_id != steps["ship"].worker_id
        await store.delete_run(run_id)
    finally:
        await store.aclose()


# -- random kill points ------------------------------------------------------------

STEPS = ("a", "b", "c", "d")
ITERATIONS = 24
PARALLEL = 4
SEED = 20_240_618
EVENT_MODES = ("before_kill", "after_kill", "during_resume")
TARGETS = ("step", "sleep", "wait", "anywhere")


@dataclass
class Plan:
    """What one iteration does: when it raises the event and when it kills."""

    iteration: int
    event_mode: str
    target: str
    kill_after_lines: int
    kill_delay: float
    raise_after_lines: int = 0
    raise_delay: float = 0.0

    @property
    def payload(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "token": f"t{self.iteration}"}


@dataclass
class Outcome:
    plan: Plan
    killed: bool = False
    start_pid: int = 0
    resume_pid: int = 0
    raised_before_kill: bool = False
    completed_before: set[str] = field(default_factory=set)
    running_before: set[str] = field(default_factory=set)
    claims_before: dict[str, int] = field(default_factory=dict)
    kinds_before: list[str] = field(default_factory=list)
    journal: list[tuple[str, int]] = field(default_factory=list)

    @property
    def phase(self) -> str:
        """Where the kill landed, from what the store had recorded."""
        if not self.killed:
            return "finished"
        if self.running_before:
            return "in step"
        kinds = self.kinds_before
        if kinds.count("timer_created") > kinds.count("timer_fired") and "c" not in (
            self.completed_before
        ):
            return "in sleep"
        if "run_completed" in kinds:
            return "after the run completed"
        if "c" in self.completed_before and "event_received" not in kinds:
            return "in event wait"
        return "between commands"

    def describe(self) -> str:
        return (
            f"iteration {self.plan} (seed {SEED}); killed: {self.killed} ({self.phase}); "
            f"event raised before the kill: {self.raised_before_kill}; completed before "
            f"the kill: {sorted(self.completed_before)}, running: {sorted(self.running_before)}"
            f", claims {self.claims_before}; history before: {self.kinds_before}; "
            f"pids start {self.start_pid} resume {self.resume_pid}; journal {self.journal}"
        )


def _plans() -> list[Plan]:
    """Seeded plans aimed in turn at a step, the durable sleep, the event wait, anywhere.

    Timeline of the start process: each step journals first, then works 20-80 ms;
    the 100 ms sleep follows b's work and the event wait follows c's. Unless the
    event is raised before the kill, the run cannot get past the wait.
    """
    rng = random.Random(SEED)
    plans = []
    for i in range(ITERATIONS):
        mode = EVENT_MODES[i % len(EVENT_MODES)]
        last = 4 if mode == "before_kill" else 3
        target = TARGETS[i % len(TARGETS)]
        if target == "step":
            lines, delay = rng.randint(1, last), rng.uniform(0.0, 0.012)
        elif target == "sleep":
            lines, delay = 2, rng.uniform(0.085, 0.115)
        elif target == "wait":
            lines, delay = 3, rng.uniform(0.1, 0.4)
        else:
            lines, delay = rng.randint(1, last), rng.uniform(0.0, 0.2)
        plan = Plan(i, mode, target, lines, delay)
        if mode == "before_kill":
            plan.raise_after_lines = rng.randint(0, lines)
            plan.raise_delay = rng.uniform(0.0, 0.05)
        elif mode == "during_resume":
            plan.raise_delay = rng.uniform(0.0, 0.8)  # after the resuming process started
        plans.append(plan)
    return plans


async def _wait_lines(journal: Path, lines: int, process: Process) -> None:
    while len(read_journal(journal)) < lines and process.returncode is None:  # noqa: ASYNC110
        await anyio.sleep(0.002)


async def _iteration(store: RedisStore, url: str, prefix: str, tmp: Path, outcome: Outcome) -> None:
    plan = outcome.plan
    run_id = f"dcrash-{plan.iteration}-{uuid.uuid4().hex[:8]}"
    journal = tmp / f"{run_id}.journal"
    errors = tmp / f"{run_id}.start.err"
    engine = Engine(store)  # only raises events: never drives the run

    async def raise_event() -> None:
        await engine.raise_event(run_id, "go", plan.payload)

    command = [sys.executable, str(CRASH), "start", url, prefix, run_id, str(journal)]
    command.append(str(START_LEASE_MS))
    with errors.open("wb") as stderr:
        process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=stderr)
        async with process:
            outcome.start_pid = process.pid
            try:
                with anyio.fail_after(CHILD_TIMEOUT):
                    if plan.event_mode == "before_kill":
                        while await store.get_run(run_id) is None:
                            assert process.returncode is None, read_text(errors)
                            await anyio.sleep(0.002)
                        await _wait_lines(journal, plan.raise_after_lines, process)
                        await anyio.sleep(plan.raise_delay)
                        if process.returncode is None:
                            await raise_event()
                            outcome.raised_before_kill = True
                    await _wait_lines(journal, plan.kill_after_lines, process)
                    await anyio.sleep(plan.kill_delay)
            finally:
                code = await kill(process)
    # Exiting 0 first is possible (the run finished before the kill); anything else
    # is the child failing on its own.
    outcome.killed = code == -signal.SIGKILL
    assert outcome.killed or code == 0, f"start child exited {code}: {read_text(errors)}"

    # Let Redis apply anything the dead process had already sent, then look.
    await anyio.sleep(0.05)
    history_before = await store.read_history(run_id)
    outcome.kinds_before = [e.kind.value for e in history_before]
    outcome.completed_before = {
        e.payload["name"] for e in _by_kind(history_before, EventKind.STEP_COMPLETED)
    }
    record_before = await store.get_run(run_id)
    assert record_before is not None
    steps = await store.list_steps(run_id)
    outcome.running_before = {s.name for s in steps if s.status == StepStatus.RUNNING}
    outcome.claims_before = {s.name: s.attempt for s in steps}
    if not outcome.killed:
        assert plan.event_mode == "before_kill", outcome.describe()
    elif plan.event_mode == "before_kill" and not outcome.raised_before_kill:
        await raise_event()  # A finished its part before the planned raise
    elif plan.event_mode == "after_kill":
        await raise_event()

    command = [sys.executable, str(CRASH), "resume", url, prefix, run_id, str(RESUME_LEASE_MS)]
    out, err = tmp / f"{run_id}.resume.out", tmp / f"{run_id}.resume.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await anyio.open_process(command, stdout=stdout, stderr=stderr)
        async with process:
            outcome.resume_pid = process.pid
            try:
                with anyio.fail_after(CHILD_TIMEOUT + 10):
                    if plan.event_mode == "during_resume":
                        await anyio.sleep(plan.raise_delay)
                        await raise_event()
                    code = await process.wait()
            finally:
                await kill(process)
    outcome.journal = read_journal(journal)
    why = outcome.describe()
    assert code == 0, f"resume child exited {code}: {read_text(err)}\n{why}"
    record = last_record(read_text(out))

    assert record.status == RunStatus.COMPLETED, f"{record.error}\n{why}"
    assert record.output["chain"] == "a>b>c>go>d", why
    assert record.output["go"] == plan.payload, why
    assert {outcome.start_pid, outcome.resume_pid} >= {p for _, p in outcome.journal}, why

    runs = Counter(step for step, _ in outcome.journal)
    runs_after = Counter(step for step, pid in outcome.journal if pid == outcome.resume_pid)
    final_claims = {s.name: s.attempt for s in await store.list_steps(run_id)}
    for step in STEPS:
        claims_before = outcome.claims_before.get(step, 0)
        assert 1 <= runs[step] <= 2, f"step {step} ran {runs[step]} times: {why}"
        assert runs[step] - runs_after[step] <= claims_before, f"{step} ran unclaimed: {why}"
        pid = record.output["steps"][step]["pid"]
        if step in outcome.completed_before:
            assert runs_after[step] == 0, f"completed step {step} ran again: {why}"
            # Once, unless the killed process's own lease lapsed (a stalled loop) and it
            # claimed the step again: then it may have run it again (at least once) or
            # only recorded the result it had under the new lease.
            assert runs[step] == 1 or claims_before > 1, f"{step} ran twice: {why}"
            assert final_claims[step] == claims_before, f"completed {step} reclaimed: {why}"
            assert pid == outcome.start_pid, why
        elif runs[step] == runs_after[step]:
            assert runs[step] == 1, f"step {step} ran twice after the kill: {why}"
            assert pid == outcome.resume_pid, why

    history = await store.read_history(run_id)
    completions = Counter(e.payload["name"] for e in _by_kind(history, EventKind.STEP_COMPLETED))
    assert completions == Counter(STEPS), f"completions recorded {completions}: {why}"
    assert not _by_kind(history, EventKind.STEP_FAILED), why
    timers = _by_kind(history, EventKind.TIMER_CREATED)
    assert sorted(e.payload["command"] for e in timers) == ["event", "sleep"], why
    (slept,) = [e for e in timers if e.payload["command"] == "sleep"]
    (fired,) = _by_kind(history, EventKind.TIMER_FIRED)  # the sleep's; the wait never timed out
    assert fired.payload["seq"] == slept.payload["seq"], why
    assert fired.timestamp - slept.timestamp >= 100, f"the durable sleep was cut short: {why}"
    (raised,) = _by_kind(history, EventKind.EVENT_RAISED)
    (received,) = _by_kind(history, EventKind.EVENT_RECEIVED)
    assert received.payload["raised_id"] == raised.event_id, why
    assert [e.event_id for e in history] == list(range(1, len(history) + 1)), why
    assert history[: len(history_before)] == history_before, f"history rewritten: {why}"
    assert len(_by_kind(history, EventKind.RUN_COMPLETED)) == 1, why
    if record_before.status == RunStatus.COMPLETED:
        # It finished before the kill: the resume changes nothing.
        assert history == history_before, why
        assert record == record_before, why
    await store.delete_run(run_id)


@pytest.mark.slow
async def test_sigkill_durable_run_at_random_points_then_resume(
    redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    outcomes = [Outcome(plan) for plan in _plans()]
    await run_against_redis(
        redis_server.url, key_prefix, tmp_path, outcomes, _iteration, parallel=PARALLEL
    )
    phases = Counter(o.phase for o in outcomes)
    lapses = sum(1 for o in outcomes for claims in o.claims_before.values() if claims > 1)
    print(f"kill phases over {ITERATIONS} iterations: {dict(phases)}; lease lapses: {lapses}")
    # The kills must exercise the interesting places, not only the gaps between them.
    assert phases["in step"] >= ITERATIONS // 6, phases
    assert phases["in sleep"] >= 2, phases
    assert phases["in event wait"] >= 2, phases
    assert sum(len(o.completed_before) for o in outcomes) >= ITERATIONS, phases
