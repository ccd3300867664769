"""DAG workflows: a named set of steps and the order they must run in.

``Workflow`` collects steps through its ``@flow.step(...)`` decorator. A step
names the steps it runs ``after``, either by the decorated function or by
name. Names may refer to steps defined later (forward references), so a
module can be laid out top-down, reading like the pipeline it describes, and
two steps can be wired without reordering code. The price is that an unknown
name can only be found once the whole workflow is defined: ``validate()``
finds it, and the engine calls ``validate()`` before every run.

Errors, and when they are raised (all are ``DefinitionError`` subclasses):

- At decoration, immediately: bad options or an empty name
  (``DefinitionError``), a second step with the same name
  (``DuplicateStepError``), a function in ``after`` that is not a step of
  this workflow (``UnknownDependencyError``, as a function cannot be a
  forward reference), and a cycle closed by the new step, itself included
  (``CycleError``). Every step of such a cycle is defined by then, so it is
  reported at the line that closes it.
- At ``validate()``: a name in ``after`` that no step of the workflow has
  (``UnknownDependencyError``).

The decorator returns the function unchanged, so a step stays a plain
function for unit tests; its frozen ``StepSpec`` hangs on it as
``__stepflow_step__`` and is kept by the workflow.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import pydantic

from stepflow import registry
from stepflow.errors import (
    CycleError,
    DefinitionError,
    DuplicateStepError,
    InputValidationError,
    UnknownDependencyError,
)
from stepflow.retry import RetryPolicy
from stepflow.store.base import id_problem

__all__ = ["STEP_ATTR", "StepSpec", "Workflow", "check_name", "get_step_spec", "step_options"]

STEP_ATTR = "__stepflow_step__"
"""Attribute under which a decorated step function carries its ``StepSpec``."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class StepSpec:
    """Everything the engine needs to run one step; fixed once the step is defined."""

    name: str
    """Unique within the workflow; recorded in the store."""
    fn: Callable[..., Any]
    """The function as written; called with the step context."""
    after: tuple[str, ...]
    """Names of the steps that must complete first, in the order given."""
    retry: RetryPolicy
    """When and how the engine retries a failed attempt."""
    timeout: float | None
    """Seconds one attempt may take, or None for no limit."""
    when: Callable[[Any], bool] | None
    """Predicate the engine calls with the step context; False skips the step."""
    is_async: bool
    """True for coroutine functions; sync steps run in a worker thread."""


def get_step_spec(obj: object) -> StepSpec | None:
    """The ``StepSpec`` attached to a decorated step function, or None."""
    spec = getattr(obj, STEP_ATTR, None)
    return spec if isinstance(spec, StepSpec) else None


def _describe(obj: object) -> str:
    """A readable name for a callable in an error message."""
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj))


def check_name(what: str, name: object) -> str:
    """A workflow's or step's name or version: a str with more than whitespace."""
    if not isinstance(name, str) or not name.strip():
        raise DefinitionError(f"{what} must be a non-empty string, got {name!r}")
    return name


def _check_step_name(what: str, name: object) -> str:
    """A step name, which is also the step's id in the store: the store's id rule holds.

    Checked at definition, so a name the store would refuse (a space, ``|``,
    a lambda's ``<lambda>``) fails here, not part-way through a run.
    """
    problem = id_problem(check_name(what, name))
    if problem is not None:
        raise DefinitionError(f"{what} {name!r} {problem}; {_ID_RULE}")
    return name  # type: ignore[return-value]  # _check_name checked it is a str


_ID_RULE = "a step name is its id in the store: 1-200 letters, digits and - _ . : @ / + ="


def step_options(
    retries: int, retry: RetryPolicy | None, timeout: float | None
) -> tuple[RetryPolicy, float | None]:
    """A step's retry policy and per-attempt timeout from its options, or `DefinitionError`.

    The same rules for a DAG step (`Workflow.step`) and a durable one
    (``ctx.step``). ``retries=n`` is shorthand for
    ``retry=RetryPolicy(retries=n)``; giving both is refused rather than
    one silently winning.
    """
    if retry is not None:
        if not isinstance(retry, RetryPolicy):
            raise DefinitionError(f"retry must be a RetryPolicy, got {retry!r}")
        if retries != 0:
            raise DefinitionError(
                "give either retries= or retry=, not both (set retries on the RetryPolicy)"
            )
        policy = retry
    else:
        policy = RetryPolicy(retries=retries)  # it checks ``retries``
    if timeout is None:
        return policy, None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise DefinitionError(f"timeout must be a number of seconds, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise DefinitionError(
            f"timeout must be a positive, finite number of seconds (or None for no "
            f"limit), got {timeout!r}"
        )
    return policy, float(timeout)


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True for coroutine functions and objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself is inspected
    )


def _find_cycle(
    graph: Mapping[str, Sequence[str]], roots: Iterable[str] | None = None
) -> list[str] | None:
    """Return one cycle of ``graph`` (step -> its dependencies) reachable from ``roots``.

    ``roots`` defaults to every step; a caller that knows where a cycle must
    pass (the step just added) searches from there and visits far less.

    The cycle is given in running order (each step runs before the next) and
    starts at the step that comes first in ``graph``, with that step repeated
    at the end, so the same definition always reports the same cycle.
    """
    rank = {name: i for i, name in enumerate(graph)}
    done: set[str] = set()
    for root in graph if roots is None else roots:
        if root in done:
            continue
        path = [root]
        on_path = {root}
        # Iterative DFS: a long chain of steps must not hit the recursion limit.
        stack: list[Iterator[str]] = [iter(graph[root])]
        while stack:
            dep = next((d for d in stack[-1] if d in graph and d not in done), None)
            if dep is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                stack.pop()
            elif dep in on_path:
                # Each step in ``path`` depends on the next, so reversing gives running order.
                cycle = path[path.index(dep) :][::-1]
                start = min(range(len(cycle)), key=lambda i: rank[cycle[i]])
                cycle = cycle[start:] + cycle[:start]
                return [*cycle, cycle[0]]
            else:
                path.append(dep)
                on_path.add(dep)
                stack.append(iter(graph[dep]))
    return None


class Workflow:
    """A named DAG of steps; define steps with ``@flow.step(...)``.

    Creating a workflow registers it by name in this process, so a run of it
    can be resumed by id later. ``input_model``, when given, validates each
    run's input and stores it in its JSON form.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = "1",
        input_model: type[pydantic.BaseModel] | None = None,
    ) -> None:
        self._name = check_name("workflow name", name)
        self._version = check_name(f"version of workflow {name!r}", version)
        if input_model is not None and not (
            isinstance(input_model, type) and issubclass(input_model, pydantic.BaseModel)
        ):
            raise DefinitionError(
                f"input_model of workflow {name!r} must be a pydantic BaseModel subclass, "
                f"got {input_model!r}"
            )
        self._input_model = input_model
        self._steps: dict[str, StepSpec] = {}
        self._referenced: set[str] = set()  # every name in some step's ``after``
        self._order: list[str] | None = None  # topological order, once validated
        self._dependents: dict[str, tuple[str, ...]] | None = None  # name -> steps after it
        registry.register(name, self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def input_model(self) -> type[pydantic.BaseModel] | None:
        return self._input_model

    @property
    def steps(self) -> Mapping[str, StepSpec]:
        """Read-only view of the steps, in definition order."""
        return MappingProxyType(self._steps)

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(self._steps)

    def step(
        self,
        name: str | None = None,
        *,
        after: Sequence[Callable[..., Any] | str] = (),
        retries: int = 0,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        when: Callable[[Any], bool] | None = None,
    ) -> Callable[[F], F]:
        """Decorator adding a step; see the module docstring for the errors it raises.

        ``retries=n`` is shorthand for ``retry=RetryPolicy(retries=n)``; give
        one or the other. The function is returned unchanged.
        """
        if callable(name):
            raise DefinitionError(
                f"use @{self._name}.step() with parentheses, or pass the step name as a string"
            )
        if name is not None:
            _check_step_name("step name", name)
        policy, timeout = step_options(retries, retry, timeout)
        if when is not None and not callable(when):
            raise DefinitionError(f"when must be callable, got {when!r}")
        # A lone name or function is an easy slip; a str would otherwise iterate by character.
        refs: Sequence[object] = (after,) if isinstance(after, str) or callable(after) else after
        if refs is None:
            refs = ()
        elif not isinstance(refs, Iterable):
            raise DefinitionError(f"after= takes step functions or names, got {after!r}")

        def decorate(fn: F) -> F:
            if not callable(fn):
                raise DefinitionError(f"@step must decorate a callable, got {fn!r}")
            step_name = name if name is not None else getattr(fn, "__name__", None)
            if step_name is None:
                raise DefinitionError(f"{fn!r} has no __name__; pass the step name explicitly")
            step_name = _check_step_name("step name", step_name)
            if step_name in self._steps:
                raise DuplicateStepError(self._name, step_name)
            deps = tuple(dict.fromkeys(self._resolve(step_name, ref) for ref in refs))
            # The steps so far are acyclic, so a new cycle must pass through this step,
            # which needs an earlier step to have named it: usually none did, so skip.
            if step_name in deps or step_name in self._referenced:
                graph = {**{s.name: s.after for s in self._steps.values()}, step_name: deps}
                cycle = _find_cycle(graph, roots=[step_name])
                if cycle is not None:
                    raise CycleError(self._name, cycle)
            spec = StepSpec(
                name=step_name,
                fn=fn,
                after=deps,
                retry=policy,
                timeout=timeout,
                when=when,
                is_async=is_async_callable(fn),
            )
            self._steps[step_name] = spec
            self._referenced.update(deps)
            self._order = self._dependents = None
            # A bound method takes no attributes; the workflow still holds its spec.
            with contextlib.suppress(AttributeError, TypeError):
                setattr(fn, STEP_ATTR, spec)
            return fn

        return decorate

    def _resolve(self, step_name: str, ref: object) -> str:
        """Turn one ``after`` entry into a step name."""
        if isinstance(ref, str):
            return _check_step_name(f"dependency of step {step_name!r}", ref)
        if not callable(ref):
            raise DefinitionError(
                f"after= of step {step_name!r} takes step functions or names, got {ref!r}"
            )
        # Match by identity, not by the attached spec: one function may be a step of
        # several workflows, and the attribute holds only the latest spec.
        matches = [s.name for s in self._steps.values() if s.fn is ref]
        if not matches:
            raise UnknownDependencyError(self._name, step_name, _describe(ref))
        if len(matches) > 1:
            raise DefinitionError(
                f"{_describe(ref)} is steps {matches} of workflow {self._name!r}; "
                f"name the one step {step_name!r} depends on"
            )
        return matches[0]

    def validate(self) -> None:
        """Check every dependency exists and there is no cycle; cached until a step is added."""
        if self._order is not None:
            return
        for spec in self._steps.values():
            for dep in spec.after:
                if dep not in self._steps:
                    raise UnknownDependencyError(self._name, spec.name, dep)
        graph = {s.name: s.after for s in self._steps.values()}
        cycle = _find_cycle(graph)
        if cycle is not None:  # decoration rejects cycles already; this guards the invariant
            raise CycleError(self._name, cycle)
        self._order = self._kahn()

    def _dependents_map(self) -> dict[str, tuple[str, ...]]:
        """Each step's dependents in definition order; built once per set of steps."""
        if self._dependents is None:
            found: dict[str, list[str]] = {name: [] for name in self._steps}
            for spec in self._steps.values():
                for dep in spec.after:
                    if dep in found:  # an undefined one is for validate() to name
                        found[dep].append(spec.name)
            self._dependents = {name: tuple(after) for name, after in found.items()}
        return self._dependents

    def _kahn(self) -> list[str]:
        """Topological order, always taking the earliest-defined ready step."""
        names = list(self._steps)
        rank = {name: i for i, name in enumerate(names)}
        dependents = self._dependents_map()
        waiting = {name: len(spec.after) for name, spec in self._steps.items()}
        ready = [rank[name] for name, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            current = names[heapq.heappop(ready)]
            order.append(current)
            for dependent in dependents[current]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    heapq.heappush(ready, rank[dependent])
        return order

    def topological_order(self) -> list[str]:
        """Step names so each comes after its dependencies; ties go by definition order."""
        self.validate()
        assert self._order is not None
        return list(self._order)

    def dependencies(self, name: str) -> tuple[str, ...]:
        """Names the step ``name`` runs after; KeyError for an undefined step."""
        return self._spec(name).after

    def opening_step(self) -> str | None:
        """The step a new run starts with: the first without dependencies or a condition.

        The engine claims it with the run's creation, in the same store call
        (None when every step without dependencies has a condition: such a
        step may be skipped, so it is not claimed ahead).
        """
        for name, spec in self._steps.items():
            if not spec.after and spec.when is None:
                return name
        return None

    def dependents(self, name: str) -> tuple[str, ...]:
        """Names of the steps that run after ``name``, in definition order.

        One lookup in the cached map: the runner asks twice per step.
        """
        try:
            return self._dependents_map()[name]
        except KeyError:
            self._spec(name)  # raises the KeyError that names the workflow
            raise

    def _spec(self, name: str) -> StepSpec:
        try:
            return self._steps[name]
        except KeyError:
            raise KeyError(f"workflow {self._name!r} has no step named {name!r}") from None

    def validate_input(self, value: Any) -> Any:
        """Validate a run's input against ``input_model`` and return its JSON form.

        Without a model the value is returned as given. Storing the dumped
        form, not the model, keeps the stored input plain JSON.
        """
        if self._input_model is None:
            return value
        try:
            model = self._input_model.model_validate(value)
        except pydantic.ValidationError as exc:
            detail = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            raise InputValidationError(self._name, detail) from exc
        return model.model_dump(mode="json")

    def __repr__(self) -> str:
        return f"Workflow({self._name!r}, version={self._version!r}, steps={list(self._steps)!r})"
