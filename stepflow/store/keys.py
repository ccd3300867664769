"""Every Redis key name stepflow uses, built here and nowhere else.

All keys of one run share the hash tag ``{<run_id>}`` so each per-run Lua
script touches a single Redis Cluster slot. Global indexes live under the
tag ``{#idx}``; ``#`` is not allowed in run ids, so no run can collide with
them. Inside the ``steps`` and ``execs`` hashes, fields are
``<step_id>|<field>`` and ``<execution_id>|<field>``; ``|`` is not allowed
in step ids either.

Layout of one run (``P`` is the prefix)::

    P:{R}:run           hash   run record, one JSON value per field
    P:{R}:ctx           hash   context bag, one JSON value per key
    P:{R}:steps         hash   four fields per step: state line, claim, result, replay
                               (see ``lua/_prelude.lua``)
    P:{R}:order         list   step ids in insertion order
    P:{R}:execs         hash   executions: status, input, output, times, event count
    P:{R}:x:<N>:events  list   history of execution N, JSON events
    P:{R}:reqs          hash   request id -> result of recently applied scripts
    P:{R}:reqlog        list   those request ids, oldest first (bounds ``reqs``)
    P:{R}:tomb          string request id and counts of the delete that removed the run (60 s)
    P:{R}:children      set    ids of the run's child runs (written before each child)

While a multi-run delete holds a run, its ``run`` hash also carries fence
fields whose names start with ``~`` (see ``lua/delete_prepare.lua``); they
are not part of the record.

Global keys::

    P:{#idx}:runs           zset   run id -> created_at (every run)
    P:{#idx}:status:<S>     zset   run id -> created_at (runs in status S)
    P:{#idx}:metrics        hash   counters: executions, events
    P:{#idx}:reqs / reqlog  hash / list   request ids the counters have applied
    P:{#idx}:layout         string the storage layout the data is in (see ``LAYOUT``)
    P:{#q:<kind>}:ready     zset   message id -> ms when ready (one queue per kind:
                                   orchestrator, worker, timer; written by the worker layer)
"""

from __future__ import annotations

from typing import NamedTuple

from stepflow.errors import InvalidArgumentError
from stepflow.models import RunStatus
from stepflow.store.base import validate_run_id

INDEX_TAG = "{#idx}"
QUEUE_KINDS = ("orchestrator", "worker", "timer")


class RunKeys(NamedTuple):
    """The fixed keys of one run; ``events(n)`` gives an execution's history key."""

    run: str
    ctx: str
    steps: str
    order: str
    execs: str
    reqs: str
    reqlog: str
    tomb: str
    children: str
    base: str

    def events(self, execution_id: int) -> str:
        return f"{self.base}:x:{int(execution_id)}:events"


class Keys:
    """Key names under one prefix (a namespace or tenant)."""

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix or any(ch in prefix for ch in "{} \t\r\n"):
            raise InvalidArgumentError(
                f"invalid key prefix {prefix!r}: non-empty, no braces or spaces"
            )
        self.prefix = prefix
        self.runs_by_time = f"{prefix}:{INDEX_TAG}:runs"
        self.metrics = f"{prefix}:{INDEX_TAG}:metrics"
        self.metrics_reqs = f"{prefix}:{INDEX_TAG}:reqs"
        self.metrics_reqlog = f"{prefix}:{INDEX_TAG}:reqlog"
        self.layout = f"{prefix}:{INDEX_TAG}:layout"

    def run(self, run_id: str) -> RunKeys:
        base = f"{self.prefix}:{{{validate_run_id(run_id)}}}"
        return RunKeys(
            run=f"{base}:run",
            ctx=f"{base}:ctx",
            steps=f"{base}:steps",
            order=f"{base}:order",
            execs=f"{base}:execs",
            reqs=f"{base}:reqs",
            reqlog=f"{base}:reqlog",
            tomb=f"{base}:tomb",
            children=f"{base}:children",
            base=base,
        )

    def runs_by_status(self, status: RunStatus) -> str:
        return f"{self.prefix}:{INDEX_TAG}:status:{status.value}"

    def queue(self, kind: str) -> str:
        """The ready queue of one kind (``orchestrator``, ``worker``, ``timer``), own slot each."""
        if kind not in QUEUE_KINDS:
            raise InvalidArgumentError(f"unknown queue {kind!r}; one of {', '.join(QUEUE_KINDS)}")
        return f"{self.prefix}:{{#q:{kind}}}:ready"

    def run_pattern(self, run_id: str) -> str:
        """A SCAN pattern matching every key of the run (for tests and repair tools)."""
        return f"{self.prefix}:{{{validate_run_id(run_id)}}}:*"
