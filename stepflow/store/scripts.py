"""The Lua scripts of `RedisStore`: loading, registration and error mapping.

Each atomic operation is one ``.lua`` file in ``stepflow/store/lua``, shipped
as package data. ``_prelude.lua`` holds helpers the scripts share; the ones
a script uses are placed after its ``#!lua`` line. The store sends a script
by its SHA and loads it again after NOSCRIPT (``SCRIPT FLUSH``, a failover):
``RedisCore._run_script``, and ``_rerun_if_noscript`` for pipelined ones.

The ``#!lua`` line lets Redis Cluster refuse a script that touches a key it
was not given. Real Redis >= 7 accepts it; older servers and fakeredis do
not, so the store probes once and strips the line where it is refused.

Scripts report refusals as ``SF_<CODE> <detail>``; `raise_for_script_error`
is the one place that turns them into `StepflowError` subclasses.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any, NoReturn

from redis.exceptions import ResponseError

from stepflow import _json
from stepflow.errors import (
    ConflictError,
    ExecutionNotFoundError,
    LeaseHeldError,
    RunCancelledError,
    RunDeletingError,
    RunNotFoundError,
    RunStillRunningError,
    ScriptError,
    StaleLeaseError,
    StepAlreadyCompletedError,
    StepflowError,
)

SCRIPT_NAMES = (
    "add_child",
    "append_event",
    "bump_metrics",
    "claim_step",
    "complete_step",
    "continue_as_new",
    "create_run",
    "delete_decide",
    "delete_prepare",
    "delete_release",
    "delete_run",
    "fail_step",
    "get_run",
    "index_run",
    "list_executions",
    "list_steps",
    "prune_executions",
    "read_history",
    "renew_lease",
    "set_run_status",
    "update_context",
    "upsert_step",
)


def _read(name: str) -> str:
    return resources.files("stepflow.store").joinpath("lua", f"{name}.lua").read_text("utf-8")


_DEFINITION = re.compile(r"local (?:function )?((?:sf|SF)_\w+)")
_REFERENCE = re.compile(r"\b(?:sf|SF)_\w+")
_COMMENT = re.compile(r"--[^\n]*")


def _names_used(lua: str) -> set[str]:
    """The prelude names (``sf_...``, ``SF_...``) that Lua code refers to, comments aside."""
    return set(_REFERENCE.findall(_COMMENT.sub("", lua)))


@cache
def _prelude() -> dict[str, tuple[str, set[str]]]:
    """The prelude's definitions in file order: name -> (its text with the comment
    above it, the other prelude names it uses)."""
    lines = _read("_prelude").splitlines(keepends=True)
    firsts: list[int] = []  # where each definition's comment (or the definition) starts
    names: list[str] = []
    for i, line in enumerate(lines):
        if defined := _DEFINITION.match(line):
            first = i
            while first > 0 and lines[first - 1].startswith("--"):
                first -= 1
            firsts.append(first)
            names.append(defined.group(1))
    blocks: dict[str, tuple[str, set[str]]] = {}
    for name, first, end in zip(names, firsts, [*firsts[1:], len(lines)], strict=True):
        text = "".join(lines[first:end])
        blocks[name] = (text, _names_used(text) - {name})
    return blocks


def _helpers_for(body: str) -> str:
    """The prelude definitions ``body`` needs, directly or through each other, in file order.

    Only those: Redis runs a script's whole text on every call, and each
    helper defined is a closure built again each time (all of them cost
    about as much as a few ``redis.call``s).
    """
    prelude = _prelude()
    needed: set[str] = set()
    wanted = _names_used(body)
    while wanted:
        name = wanted.pop()
        if name not in prelude:
            raise ValueError(f"{name} is not defined in _prelude.lua")
        if name not in needed:
            needed.add(name)
            wanted |= prelude[name][1]
    return "".join(text for name, (text, _) in prelude.items() if name in needed)


@cache
def script_source(name: str, *, shebang: bool) -> str:
    """The text of script ``name``: its ``#!lua`` line, the prelude helpers it uses, its body."""
    first, _, body = _read(name).partition("\n")
    if not first.startswith("#!lua"):
        raise ValueError(f"{name}.lua must start with a #!lua line")
    text = f"{_helpers_for(body)}\n{body}"
    return f"{first}\n{text}" if shebang else text


def raise_for_script_error(
    exc: ResponseError, *, run_id: str, step_id: str = "", execution_id: int = 0
) -> NoReturn:
    """Raise the `StepflowError` an ``SF_<CODE>`` reply stands for.

    Anything else (a bug in a script, a server refusing it) becomes
    `ScriptError` with the server's text, so it is never mistaken for a
    refusal the caller can act on.
    """
    message = str(exc)
    code, _, detail = message.partition(" ")
    error: StepflowError
    if code == "SF_NOTFOUND":
        error = RunNotFoundError(run_id)
    elif code == "SF_CANCELLED":
        error = RunCancelledError(run_id)
    elif code == "SF_NOEXEC":
        error = ExecutionNotFoundError(run_id, execution_id)
    elif code == "SF_DONE":
        error = StepAlreadyCompletedError(run_id, step_id)
    elif code == "SF_STALE":
        error = StaleLeaseError(run_id, step_id, detail)
    elif code == "SF_HELD":
        owner, _, expires = detail.rpartition("|")
        error = LeaseHeldError(run_id, step_id, _json_text(owner), int(expires))
    elif code == "SF_CHANGED":
        error = ExecutionsChangedError(f"run {run_id!r}: {detail}")
    elif code == "SF_CONFLICT":
        error = ConflictError(f"run {run_id!r}: {detail}")
    elif code == "SF_DELETING":
        error = RunDeletingError(run_id)
    elif code == "SF_RUNNING":
        error = RunStillRunningError(run_id, _json_text(detail))
    else:
        error = ScriptError(f"Redis script failed for run {run_id!r}: {message}")
    raise error from exc


class ExecutionsChangedError(ConflictError):
    """A script was given a stale list of executions; the caller lists them again and retries."""


def _json_text(raw: str) -> str:
    try:
        value: Any = _json.loads(raw)
    except ValueError:
        return raw
    return str(value)
