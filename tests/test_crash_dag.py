"""Crash test with real processes and a real ``redis-server``.

A child process starts a DAG run; the test SIGKILLs it while a step is in
flight, then a fresh process resumes the run by id. Every step the store had
recorded ``completed`` before the kill must have run exactly once overall,
an interrupted step at most twice, no step may be missing, and the run must
complete with the full context bag. Repeated at 20 seeded, random kill
points, several runs in parallel (each with its own run id and journal).

The child program is ``tests/crash_programs/dag_crash.py``: each step body
first appends ``"<step> <pid>"`` to a journal file and fsyncs it, so the
journal says which process ran which step how often.

Leases: the resuming process waits out the killed process's lease before it
re-runs the step that was in flight, so the start process's lease is short.
It is not shorter because a lease also lapses when a live process's event
loop stalls for more than two thirds of it (the heartbeat renews every
third), and then the engine runs the step again by design (at least once):
on a loaded CI machine a 300 ms lease did lapse now and then, which would
fail this test for a reason that is not the crash. The resuming process is
never taken over, so its lease is long.
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
from typing import TYPE_CHECKING

import anyio
import pytest
from crash_harness import kill, last_record, read_journal, read_text, run_against_redis

from stepflow import EventKind, RedisStore, RunRecord, RunStatus, StepStatus

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CHILD = Path(__file__).parent / "crash_programs" / "dag_crash.py"
STEPS = ("a", "b", "c1", "c2", "c3", "d")
ITERATIONS = 20
PARALLEL = 5
SEED = 20_240_617
START_LEASE_MS = 1_000
RESUME_LEASE_MS = 10_000
CHILD_TIMEOUT = 30.0


@dataclass
class Outcome:
    """What one kill-and-resume iteration observed."""

    iteration: int
    kill_after_lines: int
    kill_delay: float
    killed: bool = False
    start_pid: int = 0
    resume_pid: int = 0
    completed_before: set[str] = field(default_factory=set)
    running_before: set[str] = field(default_factory=set)
    claims_before: dict[str, int] = field(default_factory=dict)
    claims_final: dict[str, int] = field(default_factory=dict)
    journal: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"iteration {self.iteration} (seed {SEED}, kill after {self.kill_after_lines} "
            f"journal lines + {self.kill_delay * 1000:.1f} ms; killed: {self.killed}; "
            f"completed before kill: {sorted(self.completed_before)}, running: "
            f"{sorted(self.running_before)}; claims before kill {self.claims_before}, "
            f"in the end {self.claims_final}; start pid {self.start_pid}, journal: "
            f"{self.journal})"
        )


async def _start_and_kill(
    url: str, prefix: str, run_id: str, journal: Path, errors: Path, outcome: Outcome
) -> None:
    """Start the run in a child and SIGKILL it once the journal reaches the kill point."""
    command = [sys.executable, str(CHILD), "start", url, prefix, run_id, str(journal)]
    command.append(str(START_LEASE_MS))
    with errors.open("wb") as stderr:
        process = await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=stderr)
        async with process:
            outcome.start_pid = process.pid
            try:
                with anyio.fail_after(CHILD_TIMEOUT):
                    while len(read_journal(journal)) < outcome.kill_after_lines:
                        if process.returncode is not None:
                            break
                        await anyio.sleep(0.002)
                    await anyio.sleep(outcome.kill_delay)
            finally:
                await kill(process)
    # Exiting 0 first is possible (the run finished just before the kill); anything
    # else is the child failing on its own.
    outcome.killed = process.returncode == -signal.SIGKILL
    assert outcome.killed or process.returncode == 0, (
        f"the start child failed with {process.returncode} before the kill: "
        f"{read_text(errors)}\n{outcome.describe()}"
    )


async def _resume(url: str, prefix: str, run_id: str) -> RunRecord:
    command = [sys.executable, str(CHILD), "resume", url, prefix, run_id, str(RESUME_LEASE_MS)]
    with anyio.fail_after(CHILD_TIMEOUT + 10):
        result = await anyio.run_process(command, check=False)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"resume child failed ({result.returncode}):\n{stderr}"
    return last_record(result.stdout.decode())


async def _iteration(
    store: RedisStore, url: str, prefix: str, tmp: Path, outcome: Outcome
) -> RunRecord:
    run_id = f"crash-{outcome.iteration}-{uuid.uuid4().hex[:8]}"
    journal = tmp / f"{run_id}.journal"
    await _start_and_kill(url, prefix, run_id, journal, tmp / f"{run_id}.stderr", outcome)
    # Let Redis apply anything the dead process had already sent, then look.
    await anyio.sleep(0.05)
    before = await store.list_steps(run_id)
    outcome.completed_before = {s.step_id for s in before if s.status == StepStatus.COMPLETED}
    outcome.running_before = {s.step_id for s in before if s.status == StepStatus.RUNNING}
    outcome.claims_before = {s.step_id: s.attempt for s in before}

    record = await _resume(url, prefix, run_id)
    final = {s.step_id: s for s in await store.list_steps(run_id)}
    outcome.claims_final = {step: state.attempt for step, state in final.items()}
    outcome.journal = read_journal(journal)
    pids = {pid for _, pid in outcome.journal} - {outcome.start_pid}
    assert len(pids) <= 1, f"steps ran in more than two processes: {outcome.describe()}"
    outcome.resume_pid = pids.pop() if pids else 0
    why = outcome.describe()

    assert record.status == RunStatus.COMPLETED, f"{record.error}\n{why}"
    assert set(record.context) >= {f"{s}_pid" for s in STEPS} | {f"{s}_attempt" for s in STEPS}
    assert record.context["b_saw_a"] is True, why
    assert record.context["d_saw"] == sorted(f"{s}_pid" for s in STEPS if s != "d"), why

    runs = Counter(step for step, _ in outcome.journal)
    runs_before = Counter(step for step, pid in outcome.journal if pid == outcome.start_pid)
    assert set(runs) == set(STEPS), f"a step never ran: {why}"
    for step in STEPS:
        # Each run of a step body follows a claim of the step by that process.
        claims_before = outcome.claims_before.get(step, 0)
        assert runs_before[step] <= claims_before, f"{step} ran unclaimed: {why}"
        assert runs[step] - runs_before[step] <= final[step].attempt - claims_before, why

        assert 1 <= runs[step] <= 2, f"step {step} ran {runs[step]} times: {why}"
        if step in outcome.completed_before:
            assert runs[step] == 1, f"completed step {step} ran again: {why}"
            assert final[step].attempt == claims_before, f"completed {step} reclaimed: {why}"
            assert record.context[f"{step}_pid"] == outcome.start_pid, why
        elif runs_before[step] == 0:
            assert runs[step] == 1, f"step {step} ran twice after the kill: {why}"
            assert record.context[f"{step}_pid"] == outcome.resume_pid, why

    assert set(final) == set(STEPS), why
    for step, state in final.items():
        assert state.status == StepStatus.COMPLETED, f"{step}: {state}\n{why}"
    history = await store.read_history(run_id)
    completions = Counter(e.payload["step"] for e in history if e.kind == EventKind.STEP_COMPLETED)
    assert completions == Counter(STEPS), f"completions recorded {completions}: {why}"
    await store.delete_run(run_id)
    return record


async def test_sigkill_mid_step_then_resume_in_a_fresh_process(
    redis_server: RedisServer, key_prefix: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    outcomes = []
    for i in range(ITERATIONS):
        lines = rng.randint(1, len(STEPS))
        # A step sleeps 20-80 ms after journalling and the gaps between steps last a
        # few ms, so most kills land mid-step; the longer delays reach partly finished
        # fan-outs, and the last step's store call, which completes the run with it.
        delay = rng.uniform(0.0, 0.05 if lines < len(STEPS) else 0.03)
        outcomes.append(Outcome(iteration=i, kill_after_lines=lines, kill_delay=delay))
    await run_against_redis(
        redis_server.url, key_prefix, tmp_path, outcomes, _iteration, parallel=PARALLEL
    )
    in_flight = sum(1 for o in outcomes if o.killed and o.running_before)
    assert in_flight >= ITERATIONS // 2, (
        f"only {in_flight} of {ITERATIONS} kills landed while a step was in flight"
    )
    assert sum(len(o.completed_before) for o in outcomes) > 0
