"""The one error hierarchy of stepflow.

Every error stepflow raises on purpose is a `StepflowError`. Where a caller
would naturally catch a builtin, the error also derives from it, so
``except ValueError`` around bad input or ``except LookupError`` around a
missing run keeps working::

    StepflowError
    ├── InvalidRunIdError(ValueError)          a run id unfit for a key name
    ├── InvalidStepIdError(ValueError)         a step id (a step's name) the store refuses
    ├── InvalidPayloadError(ValueError)        a value that is not JSON
    │   └── PayloadTooLargeError               over the store's size limit
    ├── InputValidationError(ValueError)       run input rejected by input_model
    ├── InvalidStatusError(ValueError)         a status name that does not exist
    ├── InvalidArgumentError(ValueError)       an option or argument out of its range
    ├── NotFoundError(LookupError)
    │   ├── RunNotFoundError                   .run_id
    │   ├── StepNotFoundError                  .run_id, .step_id
    │   ├── ExecutionNotFoundError             .run_id, .execution_id
    │   └── WorkflowNotFoundError              .workflow (not registered here)
    │       └── WorkflowVersionError           a durable run of another version: .run_id
    ├── LeaseError                             the step lease protocol
    │   ├── LeaseHeldError                     another owner's lease is live
    │   ├── StaleLeaseError                    a write carried an old lease
    │   └── StepAlreadyCompletedError          the step finished already
    ├── ConflictError                          state changed under the caller
    │   └── RunDeletingError                   a delete holds the run: .run_id
    ├── DeleteRefusedError                     a delete that would break a rule
    │   ├── RunStillRunningError               unfinished, no force: .run_id, .status
    │   ├── SubRunDeleteError                  a child run alone: .run_id, .root_id
    │   └── OrphanRunError                     a child left behind: .parent_id, .child_id
    ├── DefinitionError(ValueError)            a workflow definition is invalid
    │   ├── DuplicateStepError                 .name
    │   ├── UnknownDependencyError             .step, .dependency
    │   └── CycleError                         .cycle
    ├── RunFailedError                         a run ended failed: .run_id, .error
    ├── RunCancelledError                      a run was cancelled: .run_id
    ├── StepFailedError                        ctx.step failed for good: .name, .error
    ├── ChildRunFailedError                    ctx.child's run failed: .run_id, .error
    ├── NonDeterminismError                    replay diverged from the history
    ├── StepTimeoutError(TimeoutError)         one attempt ran past its timeout
    ├── StepCancelledError                     a step raised CancelledError, uncancelled
    ├── EventTimeoutError(TimeoutError)        ctx.wait_for_event timed out
    ├── WaitTimeoutError(TimeoutError)         Engine.wait gave up
    └── StoreError                             the backend misbehaved
        ├── ScriptError                        a Lua script failed unexpectedly
        └── StoreLayoutError                   data stored in a layout this version cannot read
"""

from __future__ import annotations

from typing import Any

_ID_ALPHABET = "Use 1-200 characters from letters, digits and - _ . : @ / + ="
"""The run and step id rule (`stepflow.store.base.id_problem`), for error messages."""


class StepflowError(Exception):
    """Root of every error stepflow raises on purpose."""


class InvalidRunIdError(StepflowError, ValueError):
    """A run id that cannot be stored: empty, too long or with forbidden characters."""

    def __init__(self, run_id: object, reason: str) -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(f"invalid run id {run_id!r}: {reason}. {_ID_ALPHABET}")


class InvalidStepIdError(StepflowError, ValueError):
    """A step id the store refuses: empty, too long or with forbidden characters.

    A DAG step's id is its name, so `Workflow.step` refuses such a name at
    definition (as a `DefinitionError`); this is what a store or ``ctx.step``
    raises for one that reaches them.
    """

    def __init__(self, step_id: object, reason: str) -> None:
        self.step_id = step_id
        self.reason = reason
        super().__init__(f"invalid step id {step_id!r}: {reason}. {_ID_ALPHABET}")


class InvalidPayloadError(StepflowError, ValueError):
    """A value that cannot be stored as JSON (NaN, a set, an object, a non-str key...)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what} is not storable JSON: {reason}")


class PayloadTooLargeError(InvalidPayloadError):
    """A JSON payload over the store's configured size limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            what,
            f"{size} bytes encoded, over the limit of {limit} bytes "
            "(raise max_payload_bytes on the store, or keep large blobs elsewhere "
            "and store a reference)",
        )


class InputValidationError(StepflowError, ValueError):
    """The run input did not validate against the workflow's ``input_model``."""

    def __init__(self, workflow: str, detail: str) -> None:
        self.workflow = workflow
        self.detail = detail
        super().__init__(f"input for workflow {workflow!r} is invalid: {detail}")


class InvalidArgumentError(StepflowError, ValueError):
    """An option or argument out of its range: a count below 1, an empty name, a bad prefix."""


class InvalidStatusError(StepflowError, ValueError):
    """A status given as text is not one of the known statuses."""

    def __init__(self, status: object, allowed: list[str]) -> None:
        self.status = status
        self.allowed = allowed
        super().__init__(f"unknown status {status!r}: use one of {', '.join(allowed)} (any case)")


class NotFoundError(StepflowError, LookupError):
    """Something that was asked for by id does not exist."""


class RunNotFoundError(NotFoundError):
    """No run with this id exists in the store."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} not found")


class StepNotFoundError(NotFoundError):
    """The run has no step with this id."""

    def __init__(self, run_id: str, step_id: str) -> None:
        self.run_id = run_id
        self.step_id = step_id
        super().__init__(f"step {step_id!r} of run {run_id!r} not found")


class ExecutionNotFoundError(NotFoundError):
    """The run has no execution with this number."""

    def __init__(self, run_id: str, execution_id: int) -> None:
        self.run_id = run_id
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id} of run {run_id!r} not found")


class WorkflowNotFoundError(NotFoundError):
    """No workflow of this name is known to this process."""

    def __init__(self, workflow: str) -> None:
        self.workflow = workflow
        super().__init__(
            f"workflow {workflow!r} is not registered in this process: import the "
            "module that defines it, or pass it in Engine(store, workflows=[...])"
        )


class WorkflowVersionError(WorkflowNotFoundError):
    """A durable run was started by another version of its workflow than this process has.

    Its history holds the commands of that version, so a replay with this one
    would fail it: the run is left as stored, for a process running its version.
    """

    def __init__(self, workflow: str, run_id: str, stored: str, here: str) -> None:
        NotFoundError.__init__(
            self,
            f"run {run_id!r} was started by version {stored!r} of workflow {workflow!r}; "
            f"this process has version {here!r}: resume it where version {stored!r} runs",
        )
        self.workflow = workflow
        self.run_id = run_id
        self.stored_version = stored
        self.version = here


class LeaseError(StepflowError):
    """The step lease protocol refused an operation."""


class LeaseHeldError(LeaseError):
    """Another owner holds a live lease on the step."""

    def __init__(self, run_id: str, step_id: str, owner: str, expires_at: int) -> None:
        self.run_id = run_id
        self.step_id = step_id
        self.owner = owner
        self.expires_at = expires_at
        super().__init__(
            f"step {step_id!r} of run {run_id!r} is leased by {owner!r} "
            f"until {expires_at} ms; retry after the lease expires"
        )


class StaleLeaseError(LeaseError):
    """A write carried a lease that expired or was taken over; it was refused."""

    def __init__(self, run_id: str, step_id: str, detail: str) -> None:
        self.run_id = run_id
        self.step_id = step_id
        super().__init__(
            f"write to step {step_id!r} of run {run_id!r} refused: {detail}; "
            "another owner may be running it, so this result is discarded"
        )


class StepAlreadyCompletedError(LeaseError):
    """The step completed already; it is never run or recorded again."""

    def __init__(self, run_id: str, step_id: str) -> None:
        self.run_id = run_id
        self.step_id = step_id
        super().__init__(f"step {step_id!r} of run {run_id!r} is already completed")


class ConflictError(StepflowError):
    """The stored state changed under the caller (e.g. an execution moved on)."""


class RunDeletingError(ConflictError):
    """A delete holds the run (between its check and its removal); the write was refused.

    A delete of several runs (a tree, a bulk delete) first fences every run
    it will remove, so nothing of them changes while it decides. The fence
    goes when the delete finishes or rolls back; when a deleting process died,
    the next delete touching the run finishes or rolls back its work.
    """

    def __init__(self, run_id: str, detail: str = "") -> None:
        self.run_id = run_id
        super().__init__(
            f"run {run_id!r} is being deleted{f' ({detail})' if detail else ''}; "
            "it takes no more writes. If no delete is running any more, delete it again "
            "to finish or roll back the interrupted one"
        )


class DeleteRefusedError(StepflowError):
    """A delete was refused before anything was removed (nothing changed)."""


class RunStillRunningError(DeleteRefusedError):
    """The run has not finished (pending or running); pass ``force=True`` to delete it anyway."""

    def __init__(self, run_id: str, status: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(
            f"run {run_id!r} is still running (status {status}): cancel it and wait, "
            "or delete with force=True"
        )


class SubRunDeleteError(DeleteRefusedError):
    """The run is a child (sub-run) of another run; delete its root, which takes the whole tree."""

    def __init__(self, run_id: str, root_id: str) -> None:
        self.run_id = run_id
        self.root_id = root_id
        super().__init__(
            f"run {run_id!r} is a sub-run of {root_id!r}: a sub-run cannot be deleted "
            f"alone; delete its root {root_id!r} (with all its descendants) instead"
        )


class OrphanRunError(DeleteRefusedError):
    """Deleting the listed runs would leave a child run without its parent."""

    def __init__(self, parent_id: str, child_id: str) -> None:
        self.parent_id = parent_id
        self.child_id = child_id
        super().__init__(
            f"run {parent_id!r} has the child run {child_id!r}, which is not in the "
            "delete: it would be orphaned. List the whole tree (Admin.get_instance_tree)"
        )


class DefinitionError(StepflowError, ValueError):
    """A workflow or step definition is invalid; raised when it is defined."""


class DuplicateStepError(DefinitionError):
    """Two steps of one workflow share a name."""

    def __init__(self, workflow: str, name: str) -> None:
        self.workflow = workflow
        self.name = name
        super().__init__(f"workflow {workflow!r} already has a step named {name!r}")


class UnknownDependencyError(DefinitionError):
    """A step depends on a step the workflow does not define."""

    def __init__(self, workflow: str, step: str, dependency: str) -> None:
        self.workflow = workflow
        self.step = step
        self.dependency = dependency
        super().__init__(
            f"step {step!r} of workflow {workflow!r} depends on unknown step {dependency!r}"
        )


class CycleError(DefinitionError):
    """The step dependencies form a cycle; ``.cycle`` names it in order."""

    def __init__(self, workflow: str, cycle: list[str]) -> None:
        self.workflow = workflow
        self.cycle = cycle
        super().__init__(f"workflow {workflow!r} has a dependency cycle: {' -> '.join(cycle)}")


class RunFailedError(StepflowError):
    """A run ended in ``failed``; ``.error`` holds the recorded error."""

    def __init__(self, run_id: str, error: Any) -> None:
        self.run_id = run_id
        self.error = error
        super().__init__(f"run {run_id!r} failed: {error}")


class RunCancelledError(StepflowError):
    """A run was cancelled."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} was cancelled")


class StepFailedError(StepflowError):
    """Raised inside a durable workflow when ``ctx.step`` failed for good.

    The workflow may catch it and carry on; the failure is in the history, so
    a replay raises it again at the same point without calling the step. The
    engine raises it too when a DAG step fails for good (the runner turns it
    into the run's error). ``__cause__`` is what the step raised, if it ran.
    """

    def __init__(self, name: str, error: Any) -> None:
        self.name = name
        self.error = error
        message = error.get("message") if isinstance(error, dict) else error
        kind = error.get("type") if isinstance(error, dict) else "Error"
        super().__init__(f"step {name!r} failed: {kind}: {message}")


class ChildRunFailedError(StepflowError):
    """Raised inside a durable workflow when a child run it awaited failed."""

    def __init__(self, run_id: str, error: Any) -> None:
        self.run_id = run_id
        self.error = error
        super().__init__(f"child run {run_id!r} failed: {error}")


class NonDeterminismError(StepflowError):
    """Replay diverged from the recorded history; the run fails rather than guess.

    ``.position`` is the command's sequence number, ``.expected`` what the
    history recorded there and ``.actual`` what the code asked for now.
    """

    def __init__(self, run_id: str, position: int, expected: str, actual: str) -> None:
        self.run_id = run_id
        self.position = position
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"run {run_id!r} is not deterministic: command #{position} was recorded as "
            f"{expected} but the workflow now asks for {actual}. Changing a workflow's "
            "steps breaks runs in flight: give the new code a new version or workflow name"
        )


class StepTimeoutError(StepflowError, TimeoutError):
    """One attempt of a step ran past its ``timeout``."""

    def __init__(self, step: str, timeout: float) -> None:
        self.step = step
        self.timeout = timeout
        super().__init__(f"step {step!r} timed out after {timeout:g} s")


class StepCancelledError(StepflowError):
    """One attempt of a step raised ``CancelledError`` while nothing cancelled the step.

    It awaited a task or future that something else cancelled. That is the
    attempt's failure (retried like any other), not a cancel of the run: taken
    for one, it would stop the step's task as if the run were cancelled.
    """

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(
            f"step {step!r} raised CancelledError without being cancelled "
            "(it awaited a task or future that was cancelled)"
        )


class EventTimeoutError(StepflowError, TimeoutError):
    """``ctx.wait_for_event`` saw no event of that name within its timeout."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(f"no event {name!r} arrived within {timeout:g} s")


class WaitTimeoutError(StepflowError, TimeoutError):
    """``Engine.wait`` gave up before the run finished; the run goes on."""

    def __init__(self, run_id: str, timeout: float) -> None:
        self.run_id = run_id
        self.timeout = timeout
        super().__init__(f"run {run_id!r} did not finish within {timeout:g} s")


class StoreError(StepflowError):
    """The storage backend failed in a way stepflow did not expect."""


class ScriptError(StoreError):
    """A Lua script returned an error stepflow has no mapping for."""


class StoreLayoutError(StoreError):
    """The store holds data in a layout this version of stepflow does not read.

    Raised before anything is written: run the stepflow version that wrote
    the data to finish its runs, or use another prefix.
    """

    def __init__(self, found: str, expected: str) -> None:
        self.found = found
        self.expected = expected
        super().__init__(
            f"this store's data is in layout {found!r}; this stepflow reads and writes "
            f"layout {expected!r} (finish those runs with the version that wrote them, "
            "or use another prefix)"
        )
