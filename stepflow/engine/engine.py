"""`Engine`: starts, resumes, waits for and cancels runs against a store.

``await engine.run(flow, input)`` runs a workflow in the calling task and
returns its `RunRecord`. Inside ``async with Engine(store) as engine`` the
engine also owns background runs (`start`, `resume`); leaving the block
stops the runs still in flight and hands their steps back, so their status
stays ``running`` in the store and a later `resume` (in this process or a
fresh one) finishes them from their last completed step.

A background run whose driver fails (the store lost past its retries, not
a step: a step's failure is recorded in the run) stops alone: it is left as
stored, resumable, the engine's other runs go on, the error is logged, and
`wait` for that run raises it, as `run` would have.

Workflows register by name when they are defined, so a fresh process that
imports the defining module can resume any run by id. ``workflows=[...]``
narrows the set this engine accepts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from stepflow import registry
from stepflow.dag import Workflow
from stepflow.engine.attempts import CANCELLED_ERROR, claimed_or_handed_back
from stepflow.engine.dag_runner import StopReason
from stepflow.engine.runners import Definition, RunnerServices, is_definition, make_runner
from stepflow.errors import (
    ConflictError,
    DefinitionError,
    ExecutionNotFoundError,
    InvalidArgumentError,
    RunCancelledError,
    RunNotFoundError,
    StepflowError,
    WaitTimeoutError,
    WorkflowNotFoundError,
    WorkflowVersionError,
)
from stepflow.models import (
    EventKind,
    Lease,
    NewEvent,
    PruneOptions,
    RunRecord,
    RunStatus,
    StepClaim,
    optional_record,
)
from stepflow.store.base import DEFAULT_LEASE_MS, WorkflowStore, check_int, validate_run_id

_POLL_START = 0.02
_POLL_MAX = 0.5
_ATTEMPTS_WHILE_THE_RUN_MOVES = 10
"""How often raise_event and a cancel try again when the run moved on since it was read."""
_CRASHES_KEPT = 1000

_logger = logging.getLogger("stepflow.engine")


def _by_name(workflows: Iterable[Definition]) -> dict[str, Definition]:
    """``workflows=`` as name -> definition; anything but definitions is refused."""
    if isinstance(workflows, (str, bytes)) or is_definition(workflows):
        raise InvalidArgumentError("workflows must be a list of workflow definitions")
    try:
        given = list(workflows)
    except TypeError:
        raise InvalidArgumentError(
            f"workflows must be a list of workflow definitions, got {workflows!r}"
        ) from None
    found = {}
    for flow in given:
        if not is_definition(flow):
            raise InvalidArgumentError(
                f"workflows must hold stepflow.Workflow or @stepflow.workflow definitions, "
                f"got {flow!r}"
            )
        found[flow.name] = flow
    return found


def default_owner() -> str:
    """A lease owner id that tells an operator which process held a step."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class _Created:
    """A run this engine has just created, with the lease on its opening step (if claimed)."""

    record: RunRecord
    first_lease: Lease | None


@dataclass
class _ActiveRun:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    finished: anyio.Event = field(default_factory=anyio.Event)
    stop: StopReason | None = None


class Engine:
    """Runs workflows against a `WorkflowStore`; see the module docstring."""

    def __init__(
        self,
        store: WorkflowStore,
        *,
        workflows: Iterable[Definition] | None = None,
        max_concurrency: int = 16,
        lease_ms: int = DEFAULT_LEASE_MS,
        owner: str | None = None,
        default_prune: PruneOptions | None = None,
    ) -> None:
        check_int(max_concurrency, "max_concurrency", 1)
        check_int(lease_ms, "lease_ms", 30)  # it is renewed every third
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise InvalidArgumentError(f"owner must be a non-empty str, got {owner!r}")
        self.store = store
        self.owner = owner or default_owner()
        self.lease_ms = lease_ms
        self._workflows = _by_name(workflows) if workflows is not None else None
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._active: dict[str, _ActiveRun] = {}
        self._crashes: dict[str, Exception] = {}
        """Why a driver of the run stopped on an error, for `wait` (the newest kept)."""
        self._news: dict[str, anyio.Event] = {}
        self.default_prune = optional_record(default_prune, PruneOptions, "default_prune")
        """Pruning on continue-as-new for workflows without their own ``auto_prune``."""
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> Engine:
        self._stack = AsyncExitStack()
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._stack is not None
        assert self._tg is not None
        for active in self._active.values():
            active.stop = active.stop or "shutdown"
        self._tg.cancel_scope.cancel()
        try:
            # Not handed the block's own exception: the task group would raise it
            # wrapped in an exception group; returning None lets it go on as is.
            await self._stack.__aexit__(None, None, None)
        finally:
            self._stack = self._tg = None

    # -- definitions ------------------------------------------------------------

    def workflow(self, name: str) -> Definition:
        """The definition this engine runs for workflow ``name``, validated.

        Validated here, not only when a run starts, so a resumed run of a
        definition that went wrong since (a dependency renamed away) is
        refused rather than run around the gap.
        """
        if self._workflows is not None:
            if name not in self._workflows:
                raise WorkflowNotFoundError(name)
            definition = self._workflows[name]
        else:
            found = registry.lookup(name)
            if not is_definition(found):
                raise WorkflowNotFoundError(name)
            definition = found  # type: ignore[assignment]
        definition.validate()  # cached by the definition
        return definition

    # -- starting runs ----------------------------------------------------------

    async def run(
        self, flow: Definition, input: Any = None, *, run_id: str | None = None
    ) -> RunRecord:
        """Run ``flow`` to its end in the calling task and return the final record.

        A failed run is returned, not raised: check ``record.status`` and
        ``record.error``. With the ``run_id`` of an existing run of the same
        workflow, this resumes it instead (a finished run is returned as is).
        """
        run_id, created = await self._prepare(flow, input, run_id)
        return await self._drive(run_id, created=created)

    async def start(self, flow: Definition, input: Any = None, *, run_id: str | None = None) -> str:
        """Store the run and return its id at once; it runs in the background."""
        tg = self._require_started("start")
        run_id, created = await self._prepare(flow, input, run_id)
        self._launch(tg, run_id, rerun_finished=False, created=created)
        return run_id

    async def resume(self, run_id: str) -> str:
        """Continue a stored run in the background from its last completed step.

        A failed or cancelled DAG run runs again: completed steps keep their
        results, the steps that failed or never ran are attempted anew. A
        durable run replays its history, so a step failure it recorded is
        raised again at the same point (fix the workflow to handle it, and
        the resumed run takes the new path). A completed run is left as is.
        """
        tg = self._require_started("resume")
        record = await self._existing(run_id)
        if record.status != RunStatus.COMPLETED:  # left as is: no definition needed
            self._definition_for(record)  # fail here, not in the background
        self._launch(tg, run_id, rerun_finished=True)
        return run_id

    def _launch(
        self,
        tg: TaskGroup,
        run_id: str,
        *,
        rerun_finished: bool,
        created: _Created | None = None,
    ) -> None:
        """Drive the run in the background, at most once per engine.

        The run is registered before its task first runs, so a `wait` or
        `cancel` right after `start`/`resume` already finds it.
        """
        if run_id in self._active:
            return
        active = self._active[run_id] = _ActiveRun()
        drive = partial(self._drive_in_background, run_id, rerun_finished, created, active)
        tg.start_soon(drive, name=f"stepflow run {run_id}")

    async def _drive_in_background(
        self, run_id: str, rerun_finished: bool, created: _Created | None, active: _ActiveRun
    ) -> None:
        """`_drive`, its failure logged and left to `wait`, not raised into the task group.

        Raised there, it would cancel every other run of the engine and come
        out of ``async with Engine`` as an exception group.
        """
        try:
            await self._drive(run_id, rerun_finished, created=created, active=active)
        except Exception as exc:
            _logger.error(
                "run %s stopped: %r; it stays as stored, resume it once the cause is gone",
                run_id,
                exc,
                exc_info=exc,
            )

    def _require_started(self, what: str) -> TaskGroup:
        if self._tg is None:
            raise StepflowError(
                f"Engine.{what} runs work in the background: use "
                "'async with Engine(store) as engine:' (or await engine.run(...) instead)"
            )
        return self._tg

    async def _existing(self, run_id: str) -> RunRecord:
        record = await self.store.get_run(validate_run_id(run_id))
        if record is None:
            raise RunNotFoundError(run_id)
        return record

    async def _prepare(
        self,
        flow: Definition,
        input: Any,
        run_id: str | None,
    ) -> tuple[str, _Created | None]:
        """Validate, then store the new run (nothing is stored when validation fails).

        Returns the run id and the run as created, or None when a run of
        that id existed already (it is resumed, not replaced). The definition's
        opening step is claimed in the same store call as the create.
        """
        # One this engine cannot drive is refused before it is stored.
        definition = self._runnable(flow)
        value = flow.validate_input(input)
        run_id = validate_run_id(run_id) if run_id is not None else uuid.uuid4().hex
        # Created running, with its run_started, in one write: this engine
        # drives it from here on (a crash before that leaves a running run
        # for `resume`, as a crash at any later point does).
        record = RunRecord(
            run_id=run_id,
            workflow=flow.name,
            version=flow.version,
            input=value,
            status=RunStatus.RUNNING,
        )
        started = NewEvent(kind=EventKind.RUN_STARTED, payload=value)
        # Only if absent: a second start of the same id (a retry, another
        # process) resumes the run rather than wiping what it did.
        opening = definition.opening_step()
        if opening is None:
            made = await self.store.create_run(record, only_if_absent=True, event=started)
            lease = None
        else:
            first = StepClaim(step_id=opening, name=opening, lease_ms=self.lease_ms)
            made, lease = await claimed_or_handed_back(
                self.store,
                self.store.create_and_claim(record, first, owner=self.owner, event=started),
                lambda created: created[1],
            )
        if made:
            return run_id, _Created(record, lease)
        existing = await self._existing(run_id)
        if existing.workflow != flow.name:
            raise ConflictError(
                f"run {run_id!r} exists and belongs to workflow {existing.workflow!r}, "
                f"not {flow.name!r}; choose another run id"
            )
        return run_id, None

    def _definition_for(self, record: RunRecord) -> Definition:
        """The definition this engine drives ``record`` with.

        A durable run replays its history, which holds its version's
        commands: a run of another version than the one here is refused
        (`WorkflowVersionError`) and left as stored, rather than replayed
        with other code and failed. A DAG run is resumed with the code here.
        """
        definition = self.workflow(record.workflow)
        replays = not isinstance(definition, Workflow)  # durable workflows; DAGs do not
        if replays and definition.version != record.version:
            raise WorkflowVersionError(
                record.workflow, record.run_id, record.version, definition.version
            )
        return definition

    def _runnable(self, flow: Definition) -> Definition:
        """``flow``, validated, if this engine runs it under its name; else a clear error.

        Runs are stored by workflow name and driven by the definition the
        engine holds under it, so a ``flow`` another definition of its name
        replaced (workflows register by name, the latest wins) is refused:
        running the other one would store this one's version beside that
        one's steps. For ``run``/``start`` and for ``ctx.child``.
        """
        if not is_definition(flow):
            raise InvalidArgumentError(
                f"expected a stepflow.Workflow or @stepflow.workflow definition, got {flow!r}"
            )
        flow.validate()
        definition = self.workflow(flow.name)
        if definition is not flow:
            raise DefinitionError(
                f"another definition of workflow {flow.name!r} replaced this one (workflows "
                "register by name, the latest wins); this engine would run that one. Give "
                "each workflow a name of its own"
            )
        return definition

    async def _drive(
        self,
        run_id: str,
        rerun_finished: bool = False,
        parent: _ActiveRun | None = None,
        created: _Created | None = None,
        active: _ActiveRun | None = None,
        rerun_cancelled: bool = False,
    ) -> RunRecord:
        """Execute a stored run in this task, tracked so `wait` and `cancel` can find it.

        A child run driven inside its parent's task stops for the parent's
        reason too: cancelling the parent cancels the child it is awaiting.
        A resume of a cancelled parent resumes the cancelled children it finds
        (``rerun_cancelled``): the parent's cancel stopped them, and the
        resume goes on with them rather than fail at once on that cancel. A
        child cancelled while its parent was not (by hand) stays cancelled,
        and the parent gets its `ChildRunFailedError`. ``created`` is a run
        this engine has just created: its record need not be read back, and
        the lease on its opening step goes to the runner.
        ``active`` is the run's entry `_launch` registered for this call. A run
        this engine drives already (``run`` by the id of a background run) is
        awaited, not driven a second time beside itself.
        """
        if active is None:
            if run_id in self._active:
                return await self._wait_finished(run_id)
            active = self._active[run_id] = _ActiveRun()
        self._crashes.pop(run_id, None)
        try:
            with active.scope:
                record = created.record if created is not None else await self._existing(run_id)
                # A completed run is never run again; failed and cancelled ones on resume.
                cancelled = record.status == RunStatus.CANCELLED
                rerun = rerun_finished or (rerun_cancelled and cancelled)
                if record.status == RunStatus.COMPLETED or (
                    record.status.is_terminal and not rerun
                ):
                    return record
                services = RunnerServices(
                    owner=self.owner,
                    lease_ms=self.lease_ms,
                    limiter=self._limiter,
                    default_prune=self.default_prune,
                    drive=lambda child_id: self._drive(
                        child_id, parent=active, rerun_cancelled=cancelled
                    ),
                    runnable=self._runnable,
                    wait_for_news=self._wait_for_news,
                    stop_reason=lambda: active.stop or (parent.stop if parent else None),
                    fresh=created is not None,
                    first_lease=created.first_lease if created is not None else None,
                )
                runner = make_runner(self.store, self._definition_for(record), record, services)
                record = await runner.execute()
                if record.status == RunStatus.CANCELLED:
                    await self._cancel_orphans(run_id)
                return record
            # Cancelled by Engine.cancel: the runner recorded it before leaving,
            # unless the cancel landed before the runner had started its steps.
            return await self._mark_cancelled(await self._existing(run_id))
        except Exception as exc:  # kept before `finished` is set, for the waiters
            self._crashes[run_id] = exc
            while len(self._crashes) > _CRASHES_KEPT:
                del self._crashes[next(iter(self._crashes))]
            raise
        finally:
            active.finished.set()
            self._active.pop(run_id, None)
            self._news.pop(run_id, None)  # else kept for every run that ever waited

    # -- watching and stopping runs ------------------------------------------------

    async def wait(self, run_id: str, timeout: float | None = None) -> RunRecord:
        """Wait until the run is completed, failed or cancelled, and return its record.

        Works for runs of any process: a run this engine drives is awaited
        directly, any other is polled in the store. Raises `WaitTimeoutError`
        after ``timeout`` seconds; the run itself goes on. When this engine's
        driver of the run stopped on an error (the store lost, say) and the
        run is not finished, raises that error: nothing drives the run until
        it is resumed.
        """
        validate_run_id(run_id)
        if timeout is not None and (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
        ):
            raise InvalidArgumentError(
                f"timeout must be a number of seconds or None, got {timeout!r}"
            )
        seen = None
        if run_id not in self._active:
            # One look before the clock runs, so a finished run is returned with any
            # timeout, 0 included, on every store (a read over a network takes time).
            seen = await self._existing(run_id)
            if seen.status.is_terminal:
                return seen
        try:
            with anyio.fail_after(timeout):
                return await self._wait_finished(run_id, seen)
        except TimeoutError as exc:
            raise WaitTimeoutError(run_id, timeout or 0.0) from exc

    async def _wait_finished(self, run_id: str, seen: RunRecord | None = None) -> RunRecord:
        """The run once finished; ``seen``, the run as just read, saves the first read."""
        delay = _POLL_START
        while True:
            active = self._active.get(run_id)
            if active is not None:
                await active.finished.wait()
                seen = None  # it has moved on since
            record = seen or await self._existing(run_id)
            seen = None
            if record.status.is_terminal:
                return record
            crash = self._crashes.get(run_id)  # gone once a resume drives the run again
            if crash is not None:
                raise crash
            if active is None:
                await anyio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel a run: running steps are interrupted, the rest never start.

        A run driven by this engine stops at once. A run of another process
        is marked ``cancelled`` in the store, which from then on refuses its
        leases' renewals, new steps and history events (a finishing step's
        result aside), so that process stops it within a third of its
        ``lease_ms``, or within a second while it waits for an event. Its
        sub-runs still going are cancelled with it. A finished run is left
        as is.
        """
        active = self._active.get(validate_run_id(run_id))
        if active is not None:
            active.stop = "cancel"
            active.scope.cancel()
            await active.finished.wait()
            return await self._existing(run_id)
        return await self._mark_cancelled(await self._existing(run_id))

    async def _mark_cancelled(self, record: RunRecord) -> RunRecord:
        """Record a run that no task of this engine drives as cancelled; a finished one stays.

        The store refuses the cancel when the run finished, or continued as
        new, since ``record`` was read: it is read again and judged again.
        Its sub-runs still going are cancelled with it, as this engine's
        cancel of a run stops the child it awaits; also when the run was
        cancelled already, so a cancel cut short by the store is completed
        by the next.
        """
        for _ in range(_ATTEMPTS_WHILE_THE_RUN_MOVES):
            if record.status == RunStatus.CANCELLED:
                break
            if record.status.is_terminal:
                return record
            try:
                record = await self.store.set_run_status(
                    record.run_id,
                    RunStatus.CANCELLED,
                    execution_id=record.current_execution_id,
                    error=CANCELLED_ERROR,
                    event=NewEvent(kind=EventKind.RUN_CANCELLED, payload=None),
                )
                break
            except ConflictError:
                record = await self._existing(record.run_id)
        else:
            raise ConflictError(
                f"run {record.run_id!r} kept moving to new executions; cancel again"
            )
        await self._cancel_children(record.run_id)
        return record

    async def _cancel_orphans(self, run_id: str) -> None:
        """Cancel what a run that ended cancelled leaves going: a child nobody will drive.

        A run cancelled by another process may have created a child as the
        cancel landed. The run is cancelled as stored whatever happens here,
        so a store that fails now is logged, not raised as the driver's
        failure: cancelling the run again finishes the job.
        """
        try:
            await self._cancel_children(run_id)
        except Exception as exc:
            _logger.warning("cancelling the sub-runs of cancelled run %r failed: %r", run_id, exc)

    async def _cancel_children(self, run_id: str) -> None:
        """Cancel the run's sub-runs (and theirs) that are still going.

        The children are listed by the admin operations
        (`AdminStore.list_children`), which both stores implement; with a
        store that lacks them, the parent alone is cancelled.
        """
        list_children = getattr(self.store, "list_children", None)
        if list_children is None:
            return
        children = await list_children(run_id)
        if not children:
            return
        parent = await self.store.get_run(run_id)
        if parent is None or parent.status != RunStatus.CANCELLED:
            return  # resumed since (by another process): its children are its own again
        for child_id in children:
            child = await self.store.get_run(child_id)
            if child is not None:
                await self._mark_cancelled(child)

    # -- events -------------------------------------------------------------------

    async def raise_event(self, run_id: str, name: str, payload: Any = None) -> None:
        """Deliver an event to a durable run; ``ctx.wait_for_event(name)`` receives it.

        The event is recorded in the run's current execution at once, so it
        is kept if the run is not waiting yet (or not running in any process)
        and delivered to the next wait for ``name``, in the order raised.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("event name must be a non-empty str")
        event = NewEvent(kind=EventKind.EVENT_RAISED, payload={"name": name, "payload": payload})
        for _ in range(_ATTEMPTS_WHILE_THE_RUN_MOVES):
            record = await self._existing(run_id)
            if record.status.is_terminal:
                raise ConflictError(f"run {run_id!r} is {record.status}; it takes no more events")
            self._refuse_events_for_dag_runs(record)
            try:
                await self.store.append_event(
                    run_id,
                    event,
                    execution_id=record.current_execution_id,
                    only_if_current=True,
                )
                break
            except (ConflictError, ExecutionNotFoundError):
                # The run continued as new meanwhile (and may have pruned the execution
                # read): raise it in the new execution.
                continue
            except RunCancelledError as exc:  # cancelled since it was read
                raise ConflictError(
                    f"run {run_id!r} is cancelled; it takes no more events"
                ) from exc
        else:
            raise ConflictError(f"run {run_id!r} kept moving to new executions; raise again")
        news = self._news.pop(run_id, None)
        if news is not None:
            news.set()

    def _refuse_events_for_dag_runs(self, record: RunRecord) -> None:
        """`InvalidArgumentError` for a run of a DAG workflow: nothing would ever take the event.

        Known only where the workflow is defined; elsewhere the event is kept,
        as for any run.
        """
        with contextlib.suppress(WorkflowNotFoundError):
            if isinstance(self.workflow(record.workflow), Workflow):
                raise InvalidArgumentError(
                    f"run {record.run_id!r} is a run of DAG workflow {record.workflow!r}: "
                    "events are for durable workflows (@stepflow.workflow)"
                )

    async def _wait_for_news(self, run_id: str, seconds: float) -> None:
        news = self._news.setdefault(run_id, anyio.Event())
        with anyio.move_on_after(seconds):
            await news.wait()
