"""Drives one run of a `DurableWorkflow`: replay, execute, continue-as-new.

The runner calls the workflow function with a fresh `WorkflowContext` over
the current execution's history. Commands already recorded return their
recorded results; the first unrecorded one does real work and records it.
When the function returns, raises, or continues as new, the runner records
that outcome in one store operation.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, cast

import anyio
import anyio.lowlevel

from stepflow.durable.context import ContinueAsNew, WorkflowContext
from stepflow.durable.definition import DurableWorkflow
from stepflow.durable.replay import Replay
from stepflow.engine.attempts import (
    CANCELLED_ERROR,
    LeaseKeeper,
    describe_error,
    sleep_watching_for_cancel,
    with_lease_keeper,
)
from stepflow.engine.runners import RunnerServices
from stepflow.errors import (
    ConflictError,
    InvalidPayloadError,
    RunCancelledError,
    StepflowError,
    StoreError,
    WorkflowNotFoundError,
)
from stepflow.models import (
    Event,
    EventKind,
    NewEvent,
    PruneOptions,
    PruneResult,
    RunRecord,
    RunStatus,
)
from stepflow.store.base import MAX_RUN_ID_LENGTH, WorkflowStore

logger = logging.getLogger("stepflow.durable")


_CONTINUE_ATTEMPTS = 10


def is_store_failure(exc: Exception) -> bool:
    """The store failed (a lost connection, a script error), as against refusing a call."""
    return isinstance(exc, StoreError) or not isinstance(exc, StepflowError)


class _FailureNotingStore:
    """A store whose failures are reported first: any error but a `StepflowError` refusal,
    and a `StoreError` (a script that failed, as on a replica during a failover).

    What a step raises reaches the workflow as `StepFailedError` and a bad
    argument to a ctx call is raised before any store call, so this sees
    the store's own failures only. A refusal because the run was cancelled
    is reported too (``note_cancel``).
    """

    def __init__(
        self,
        store: WorkflowStore,
        note: Callable[[Exception], None],
        note_cancel: Callable[[], None],
    ) -> None:
        self._store = store
        self._note = note
        self._note_cancel = note_cancel

    def __getattr__(self, name: str) -> Any:
        """The store's attribute, a coroutine method wrapped once and kept (every step calls)."""
        attribute = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @wraps(attribute)
        async def noted(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attribute(*args, **kwargs)
            except RunCancelledError:
                self._note_cancel()
                raise
            except Exception as exc:
                if is_store_failure(exc):
                    self._note(exc)
                raise

        setattr(self, name, noted)  # found before __getattr__ from now on
        return noted


class DurableRunner:
    """Executes (or resumes) one durable run; use once."""

    def __init__(
        self,
        store: WorkflowStore,
        definition: DurableWorkflow,
        record: RunRecord,
        services: RunnerServices,
    ) -> None:
        self.store = cast(
            WorkflowStore,
            _FailureNotingStore(store, self.note_store_failure, self.note_cancelled_elsewhere),
        )
        """The store, noting its failures for ``_raise_store_failure``, and a cancel."""
        self._renewals_store = store
        """The lease keeper's: a renewal the store fails is only tried again."""
        self.definition = definition
        self.record = record
        self.services = services
        self.replay = Replay(record.run_id, [])
        self._keeper: LeaseKeeper | None = None
        self._store_failure: Exception | None = None
        self._workflow_scope = anyio.CancelScope()
        """Around the workflow function; cancelled once another process cancelled the run."""
        self._read_to = 0
        """The newest event of the current execution `refresh` has read."""
        self._lifecycle: EventKind | None = None
        """Of the events read: the kind of the last ``run_started`` or ``run_cancelled``."""
        self._cancelled_elsewhere = False

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def execution_id(self) -> int:
        return self.record.current_execution_id

    @property
    def owner(self) -> str:
        return self.services.owner

    @property
    def lease_ms(self) -> int:
        return self.services.lease_ms

    @property
    def keeper(self) -> LeaseKeeper:
        """Renews the lease of each ``ctx.step`` while it runs (set for the run's duration)."""
        assert self._keeper is not None, "the lease keeper runs only inside execute()"
        return self._keeper

    async def execute(self) -> RunRecord:
        return await with_lease_keeper(self._renewals_store, self.lease_ms, self._execute)

    async def _execute(self, keeper: LeaseKeeper) -> RunRecord:
        self._keeper = keeper
        if self.record.status != RunStatus.RUNNING:
            self.record = await self.store.set_run_status(
                self.run_id,
                RunStatus.RUNNING,
                execution_id=self.execution_id,
                event=NewEvent(kind=EventKind.RUN_STARTED, payload=self.record.input),
            )
        while True:
            history = await self.store.read_history(self.run_id, self.execution_id)
            self.replay = Replay(self.run_id, history)
            self._read_to, self._lifecycle = 0, None
            self._note_read(history)
            self._workflow_scope = anyio.CancelScope()
            try:
                with self._workflow_scope:
                    output = await self.definition.fn(WorkflowContext(self), self.record.input)
                if self._cancelled_elsewhere:  # the workflow was stopped
                    return await self._stored()
            except ContinueAsNew as request:
                self._raise_store_failure()
                if self._cancelled_elsewhere:
                    return await self._stored()
                if (diverged := self.replay.divergence()) is not None:
                    return await self._finish(RunStatus.FAILED, error=describe_error(diverged))
                try:
                    await self._continue_as_new(request)
                except RunCancelledError:  # by another process meanwhile: that stands
                    return await self._stored()
                except InvalidPayloadError as refused:  # its input; nothing was written
                    # The workflow's fault, as a refused output is: every resume would
                    # ask the same, so the run fails rather than stay running. (The
                    # raised events it carries along were stored once: the store
                    # takes them, see `Codec.encode_carried`.)
                    error = describe_error(refused, traceback=False, phase="continue_as_new")
                    return await self._finish(RunStatus.FAILED, error=error)
                if self.record.status.is_terminal:  # another driver continued it, and finished
                    return self.record
                continue
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    if self.services.stop_reason() == "cancel":
                        await self._finish(RunStatus.CANCELLED, error=CANCELLED_ERROR)
                raise
            except Exception as exc:
                self._raise_store_failure()
                if self._cancelled_elsewhere:  # what it raised is the refusal, or came of it
                    return await self._stored()
                failure = self.replay.diverged or exc  # a caught mismatch comes first
                return await self._finish(RunStatus.FAILED, error=describe_error(failure))
            self._raise_store_failure()
            if (diverged := self.replay.divergence()) is not None:
                return await self._finish(RunStatus.FAILED, error=describe_error(diverged))
            return await self._finish(RunStatus.COMPLETED, output=output)

    def note_cancelled_elsewhere(self) -> None:
        """The store refused a ctx call: another process cancelled the run. Stop the workflow.

        The refusal reaches the workflow as `RunCancelledError`; a workflow that
        catches it (a retry loop around ``ctx.step``) is stopped at its next
        await anyway, as a cancel by this engine would stop it, rather than go
        on against a run that takes no more work.
        """
        self._cancelled_elsewhere = True
        self._workflow_scope.cancel()

    def note_store_failure(self, exc: Exception) -> None:
        """The store failed, or the run cannot go on in this process (a child run of a
        workflow or version it does not have): see ``_raise_store_failure``."""
        self._store_failure = self._store_failure or exc

    def _raise_store_failure(self) -> None:
        """Raise the store's failure while the workflow ran, if any, however it went on.

        A store that failed (not a refusal: a lost connection) under a ctx call
        reaches the workflow as raised, and the workflow may have re-raised it,
        caught it, or raised or returned something else. Recording any of that
        would record an outcome of a run the store never fully saw, and a store
        back in time would make it final. The run is left as stored instead,
        and a resume once the store is back replays it.
        """
        if self._store_failure is not None:
            raise self._store_failure

    async def _finish(
        self, status: RunStatus, *, output: Any = None, error: Any = None
    ) -> RunRecord:
        kinds = {
            RunStatus.COMPLETED: EventKind.RUN_COMPLETED,
            RunStatus.FAILED: EventKind.RUN_FAILED,
            RunStatus.CANCELLED: EventKind.RUN_CANCELLED,
        }
        try:
            return await self.store.set_run_status(
                self.run_id,
                status,
                execution_id=self.execution_id,
                output=output,
                error=error,
                event=NewEvent(kind=kinds[status], payload=error),
            )
        except RunCancelledError:
            # Another process cancelled the run while this one finished it: that stands.
            return await self._stored()
        except ConflictError:
            if status != RunStatus.CANCELLED:
                raise
            # Another driver finished the run (or continued it) meanwhile: that stands.
            return await self._stored()
        except StepflowError as exc:
            if status != RunStatus.COMPLETED:
                raise
            # The output itself was refused (not JSON, too large): fail clearly.
            return await self._finish(RunStatus.FAILED, error=describe_error(exc))

    async def _stored(self) -> RunRecord:
        record = await self.store.get_run(self.run_id)
        return record if record is not None else self.record

    async def _continue_as_new(self, request: ContinueAsNew) -> None:
        """End this execution and start the next, carrying unconsumed raised events.

        Raised events no wait took go to the next wait for their name, so they
        move into the new execution inside the same atomic store call. The
        call names how many events the old execution held when it was read;
        events raised in between the store carries too, and any other event
        makes it refuse, and the history is read again. When another process
        driving the run continued it first, this one follows it into the
        execution it started (``self.record`` becomes the run as stored).
        """
        prune = request.prune or self.definition.auto_prune or self.services.default_prune
        old_id = self.execution_id
        for _ in range(_CONTINUE_ATTEMPTS):
            history = await self.store.read_history(self.run_id, old_id)
            carry = [
                NewEvent(
                    kind=EventKind.EVENT_RAISED,
                    payload={**event.payload, "carried_from": [old_id, event.event_id]},
                )
                for event in Replay(self.run_id, history).pending_events()
            ]
            try:
                await self.store.continue_as_new(
                    self.run_id,
                    request.input,
                    execution_id=old_id,
                    prune=prune,
                    carry=carry,
                    seen_events=len(history),
                )
                break
            except ConflictError:
                record = await self.store.get_run(self.run_id)
                if record is not None and record.current_execution_id != old_id:
                    # Another process driving the run continued it first: follow it there.
                    self.record = record
                    return
        else:
            raise ConflictError(f"run {self.run_id!r}: events kept arriving; continue again")
        record = await self.store.get_run(self.run_id)
        assert record is not None, "the run disappeared during continue-as-new"
        self.record = record

    # -- services for WorkflowContext ---------------------------------------------

    async def append(
        self, kind: EventKind, payload: dict[str, Any], *, settled_by: tuple[EventKind, ...] = ()
    ) -> Event:
        """Record a command's event (``payload`` holds its tags) after the events read.

        Another process may drive the run too (it resumed the run while this
        one drove it) and record the command's outcome first: then that
        record is returned instead, the event of ``kind`` or of a kind in
        ``settled_by`` (a wait for an event ends received or timed out,
        whichever was recorded first), so both drivers go on from the same
        record and no command is recorded twice. The store refuses an append
        when events other than raised ones came after those read; they are
        read, and the append made after them unless they settle the command.

        Nothing is appended once the workflow is being stopped: a store call
        need not yield before it writes, so a workflow that caught the
        `RunCancelledError` of a cancel elsewhere would still record its next
        command (a timer, say) in the cancelled run without the checkpoint.
        """
        while (event := await self.try_append(kind, payload, settled_by=settled_by)) is None:
            pass
        return event

    async def try_append(
        self, kind: EventKind, payload: dict[str, Any], *, settled_by: tuple[EventKind, ...] = ()
    ) -> Event | None:
        """One try of `append`: None when the store refused it, the news now read.

        For a caller whose event depends on what it read: a wait for an event
        chooses the raised event again, as another wait of the workflow may
        have taken it meanwhile.
        """
        seq, command, name = payload["seq"], payload["command"], payload["name"]
        await anyio.lowlevel.checkpoint_if_cancelled()
        settled = self.replay.ended(seq, command, name, (kind, *settled_by))
        if settled is not None:
            self.replay.passed(seq)  # ctx.now() as the other driver's and a replay's
            return settled
        read_to = self._read_to
        try:
            event = await self.store.append_event(
                self.run_id,
                NewEvent(kind=kind, payload=payload),
                execution_id=self.execution_id,
                seen_events=read_to,
            )
        except ConflictError:
            await self.refresh()
            if self._read_to == read_to:  # nothing new: a conflict of another kind
                raise
            return None
        self.note_recorded(event)
        return event

    async def refresh(self) -> None:
        """Take in events written by others (raised events) or by the store (step results).

        Only the events after those read before are read: a run waiting for
        an event reads what is new each time, not its whole history. A
        ``run_cancelled`` after the run's last ``run_started`` is a cancel by
        another process (a resume records a new ``run_started``): the workflow
        is stopped (see `note_cancelled_elsewhere`).
        """
        news = await self.store.read_history(
            self.run_id, self.execution_id, after_event_id=self._read_to
        )
        for event in news:
            self.replay.add(event)
        self._note_read(news)
        if self._lifecycle == EventKind.RUN_CANCELLED:
            self.note_cancelled_elsewhere()

    def _note_read(self, events: list[Event]) -> None:
        """Move past ``events``, read from the current execution's history, oldest first."""
        for event in events:
            if event.kind in (EventKind.RUN_STARTED, EventKind.RUN_CANCELLED):
                self._lifecycle = event.kind
        if events:
            self._read_to = events[-1].event_id

    def note_recorded(self, event: Event | None) -> None:
        """Take in an event this runner wrote; the next `refresh` reads after it if it can.

        Only when it is the one right after those read: an event another
        process wrote in between (a raised event) must still be read.
        """
        if event is not None:
            self.replay.add(event)
            self.replay.clock = max(self.replay.clock, event.timestamp)
            if event.event_id == self._read_to + 1:
                self._note_read([event])

    async def sleep_until(self, fire_at: int) -> None:
        """Sleep until the store's clock reaches ``fire_at`` (ms), watching for a cancel.

        The store's clock decides; sleeping on ours may wake a little early. A
        long timer looks at the run as often as a running step renews its
        lease, so a cancel by another process stops the workflow (see
        `note_cancelled_elsewhere`) rather than wait for the timer. Those
        looks go to the store itself: one that fails is only logged.
        """
        while (remaining := fire_at - await self.store.time_ms()) > 0:
            if await sleep_watching_for_cancel(
                self._renewals_store, self.run_id, remaining / 1000, self.lease_ms / 3000
            ):
                self.note_cancelled_elsewhere()

    async def wait_for_news(self, seconds: float) -> None:
        await self.services.wait_for_news(self.run_id, max(seconds, 0.0))

    def child_run_id(self, seq: int) -> str:
        """A child's id: derived from this run and the call's position, stable on replay."""
        child_id = f"{self.run_id}.{self.execution_id}.{seq}"
        if len(child_id) > MAX_RUN_ID_LENGTH:
            digest = hashlib.sha256(child_id.encode()).hexdigest()[:32]
            child_id = f"child-{digest}"
        return child_id

    async def create_child(self, workflow: DurableWorkflow, child_id: str, input: Any) -> None:
        """Store the child run unless a replay finds it created already.

        A run of that id that is not this run's child of ``workflow`` (a run
        someone started under the id) is refused, not taken for the child.
        """
        created = await self.store.create_run(
            RunRecord(
                run_id=child_id,
                workflow=workflow.name,
                version=workflow.version,
                input=workflow.validate_input(input),
                parent_run_id=self.run_id,
            ),
            only_if_absent=True,
        )
        if created:
            return
        found = await self.store.get_run(child_id)
        if found is None or (found.parent_run_id, found.workflow) != (self.run_id, workflow.name):
            raise ConflictError(
                f"the id {child_id!r} of this run's child of workflow {workflow.name!r} is "
                "taken by another run; child ids are '<run id>.<execution>.<position>', so "
                "keep such ids free"
            )

    async def drive_child(self, child_id: str) -> RunRecord:
        """Drive the child to its end; one this process cannot drive leaves the parent
        as stored too (a process that has the child's workflow resumes both)."""
        try:
            return await self.services.drive(child_id)
        except WorkflowNotFoundError as exc:  # WorkflowVersionError included
            self.note_store_failure(exc)
            raise

    async def prune(self, options: PruneOptions) -> PruneResult | dict[str, Any]:
        """Prune old executions; a failure is returned (to be recorded), never raised."""
        try:
            return await self.store.prune_executions(self.run_id, options)
        except StepflowError as exc:
            logger.warning("history prune of run %s failed: %s", self.run_id, exc)
            return describe_error(exc)
