"""Definition-time checks of DAG workflows, their ordering, input validation and the registry."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from stepflow import registry
from stepflow.dag import STEP_ATTR, StepSpec, Workflow, get_step_spec
from stepflow.errors import (
    CycleError,
    DefinitionError,
    DuplicateStepError,
    InputValidationError,
    NotFoundError,
    UnknownDependencyError,
    WorkflowNotFoundError,
)
from stepflow.retry import RetryPolicy


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Workflow names a test registers; unregistered afterwards to keep the registry clean."""
    created: list[str] = []
    yield created
    for name in created:
        registry.unregister(name)


@pytest.fixture
def flow(names: list[str], request: pytest.FixtureRequest) -> Workflow:
    name = f"test-dag-{request.node.name}"
    names.append(name)
    return Workflow(name)


def _noop(ctx: Any) -> None:
    return None


# --- definition and specs -------------------------------------------------------------


def test_decorator_returns_function_unchanged_and_callable(flow: Workflow) -> None:
    def double(x: int) -> int:
        return 2 * x

    decorated = flow.step()(double)
    assert decorated is double
    assert double(21) == 42
    spec = getattr(double, STEP_ATTR)
    assert isinstance(spec, StepSpec)
    assert get_step_spec(double) is spec is flow.steps["double"]
    assert get_step_spec(_noop) is None


def test_spec_fields(flow: Workflow) -> None:
    def check(ctx: Any) -> bool:
        return True

    @flow.step()
    async def fetch(ctx: Any) -> dict[str, Any]:
        return {}

    @flow.step("parse-it", after=[fetch], retries=3, timeout=10, when=check)
    def parse(ctx: Any) -> None:
        return None

    fetch_spec = flow.steps["fetch"]
    assert fetch_spec.is_async is True
    assert fetch_spec.after == ()
    assert fetch_spec.retry == RetryPolicy()
    assert fetch_spec.timeout is None
    assert fetch_spec.when is None

    parse_spec = flow.steps["parse-it"]
    assert parse_spec.name == "parse-it"
    assert parse_spec.fn is parse
    assert parse_spec.is_async is False
    assert parse_spec.after == ("fetch",)
    assert parse_spec.retry == RetryPolicy(retries=3)
    assert parse_spec.timeout == 10.0
    assert isinstance(parse_spec.timeout, float)
    assert parse_spec.when is check
    with pytest.raises(AttributeError):
        parse_spec.name = "other"  # type: ignore[misc]


def test_retry_policy_passed_through(flow: Workflow) -> None:
    policy = RetryPolicy(retries=5, initial_delay=1.0)

    @flow.step(retry=policy)
    def a(ctx: Any) -> None: ...

    assert flow.steps["a"].retry is policy


def test_async_callable_object_is_async(flow: Workflow) -> None:
    class Step:
        async def __call__(self, ctx: Any) -> None: ...

    flow.step("obj")(Step())
    assert flow.steps["obj"].is_async is True


def test_unnamed_callable_needs_explicit_name(flow: Workflow) -> None:
    part = functools.partial(_noop)
    with pytest.raises(DefinitionError, match="pass the step name"):
        flow.step()(part)
    flow.step("partial")(part)
    assert flow.steps["partial"].fn is part


def test_properties_and_repr(names: list[str]) -> None:
    names.append("test-dag-props")
    flow = Workflow("test-dag-props", version="7")

    @flow.step()
    def a(ctx: Any) -> None: ...

    @flow.step(after=[a])
    def b(ctx: Any) -> None: ...

    assert flow.name == "test-dag-props"
    assert flow.version == "7"
    assert flow.input_model is None
    assert flow.step_names == ("a", "b")
    assert list(flow.steps) == ["a", "b"]
    assert repr(flow) == "Workflow('test-dag-props', version='7', steps=['a', 'b'])"
    with pytest.raises(TypeError):
        flow.steps["c"] = flow.steps["a"]  # type: ignore[index]


# --- dependency styles -----------------------------------------------------------------


def test_after_by_function_and_by_name(flow: Workflow) -> None:
    @flow.step()
    def a(ctx: Any) -> None: ...

    @flow.step(after=[a])
    def b(ctx: Any) -> None: ...

    @flow.step(after=["a", b])
    def c(ctx: Any) -> None: ...

    assert flow.dependencies("b") == ("a",)
    assert flow.dependencies("c") == ("a", "b")
    flow.validate()


def test_after_duplicates_collapse(flow: Workflow) -> None:
    @flow.step()
    def a(ctx: Any) -> None: ...

    @flow.step(after=[a, "a"])
    def b(ctx: Any) -> None: ...

    assert flow.dependencies("b") == ("a",)


def test_after_lone_name_is_not_split_into_characters(flow: Workflow) -> None:
    @flow.step()
    def ab(ctx: Any) -> None: ...

    @flow.step(after="ab")
    def c(ctx: Any) -> None: ...

    assert flow.dependencies("c") == ("ab",)


def test_forward_reference_by_name(flow: Workflow) -> None:
    @flow.step(after=["later"])
    def first(ctx: Any) -> None: ...

    with pytest.raises(UnknownDependencyError) as info:
        flow.validate()
    assert (info.value.workflow, info.value.step, info.value.dependency) == (
        flow.name,
        "first",
        "later",
    )

    @flow.step()
    def later(ctx: Any) -> None: ...

    flow.validate()
    flow.validate()  # idempotent
    assert flow.topological_order() == ["later", "first"]


def test_unknown_function_dependency_is_immediate(flow: Workflow, names: list[str]) -> None:
    names.append("test-dag-other")
    other = Workflow("test-dag-other")

    @other.step()
    def elsewhere(ctx: Any) -> None: ...

    with pytest.raises(UnknownDependencyError) as info:

        @flow.step(after=[elsewhere])
        def mine(ctx: Any) -> None: ...

    assert info.value.step == "mine"
    assert "elsewhere" in info.value.dependency
    assert "mine" not in flow.steps

    with pytest.raises(UnknownDependencyError):
        flow.step("plain", after=[_noop])(_noop)


def test_function_shared_by_two_workflows(flow: Workflow, names: list[str]) -> None:
    names.append("test-dag-shared")
    other = Workflow("test-dag-shared")

    def shared(ctx: Any) -> None: ...

    flow.step()(shared)
    other.step()(shared)
    # The attribute holds the newest spec, yet both workflows resolve the function.
    flow.step("next", after=[shared])(_noop)
    other.step("next", after=[shared])(_noop)
    assert flow.dependencies("next") == other.dependencies("next") == ("shared",)


def test_same_function_twice_in_one_workflow_is_ambiguous(flow: Workflow) -> None:
    flow.step("one")(_noop)
    flow.step("two")(_noop)
    with pytest.raises(DefinitionError, match="name the one step"):
        flow.step("three", after=[_noop])(_noop)


# --- definition errors -----------------------------------------------------------------


def test_duplicate_step(flow: Workflow) -> None:
    @flow.step()
    def a(ctx: Any) -> None: ...

    with pytest.raises(DuplicateStepError) as info:
        flow.step("a")(_noop)
    assert (info.value.workflow, info.value.name) == (flow.name, "a")
    assert isinstance(info.value, DefinitionError)
    assert isinstance(info.value, ValueError)
    assert flow.steps["a"].fn is a


def test_self_cycle(flow: Workflow) -> None:
    with pytest.raises(CycleError) as info:

        @flow.step(after=["a"])
        def a(ctx: Any) -> None: ...

    assert info.value.cycle == ["a", "a"]
    assert info.value.workflow == flow.name
    assert "a" not in flow.steps


def test_three_cycle_via_forward_names(flow: Workflow) -> None:
    @flow.step(after=["c"])
    def a(ctx: Any) -> None: ...

    @flow.step(after=["a"])
    def b(ctx: Any) -> None: ...

    with pytest.raises(CycleError) as info:

        @flow.step(after=["b"])
        def c(ctx: Any) -> None: ...

    # Running order (a before b before c before a), starting at the first-defined step.
    assert info.value.cycle == ["a", "b", "c", "a"]
    assert "a -> b -> c -> a" in str(info.value)
    assert flow.step_names == ("a", "b")


def test_cycle_off_a_longer_path_names_only_the_cycle(flow: Workflow) -> None:
    flow.step("root")(_noop)
    flow.step("x", after=["root", "z"])(_noop)
    flow.step("y", after=["x"])(_noop)
    with pytest.raises(CycleError) as info:
        flow.step("z", after=["y"])(_noop)
    assert info.value.cycle == ["x", "y", "z", "x"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"retries": 1.5}, "retries must be an int"),
        ({"retries": True}, "retries must be an int"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"timeout": -2.0}, "timeout must be a positive"),
        ({"timeout": float("nan")}, "timeout must be a positive"),
        ({"timeout": "5"}, "timeout must be a number"),
        ({"retries": 2, "retry": RetryPolicy(retries=1)}, "not both"),
        ({"retry": 3}, "retry must be a RetryPolicy"),
        ({"when": True}, "when must be callable"),
        ({"name": ""}, "step name must be a non-empty string"),
        ({"name": "  "}, "step name must be a non-empty string"),
        ({"after": [42]}, "takes step functions or names"),
        ({"after": [""]}, "must be a non-empty string"),
    ],
)
def test_bad_step_options(flow: Workflow, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        flow.step(**kwargs)(_noop)
    assert flow.step_names == ()


def test_decorating_a_non_callable(flow: Workflow) -> None:
    with pytest.raises(DefinitionError, match="must decorate a callable"):
        flow.step("x")(42)  # type: ignore[type-var]


def test_bare_decorator_without_parentheses(flow: Workflow) -> None:
    with pytest.raises(DefinitionError, match="with parentheses"):
        flow.step(_noop)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "   ", None])
def test_bad_workflow_name(name: Any) -> None:
    with pytest.raises(DefinitionError, match="workflow name"):
        Workflow(name)


def test_bad_version_and_input_model() -> None:
    with pytest.raises(DefinitionError, match="version"):
        Workflow("test-dag-bad-version", version="")
    with pytest.raises(DefinitionError, match="input_model"):
        Workflow("test-dag-bad-model", input_model=dict)  # type: ignore[arg-type]
    assert "test-dag-bad-version" not in registry.registered()


# --- ordering ----------------------------------------------------------------------------


def test_diamond_order_and_dependents(flow: Workflow) -> None:
    @flow.step()
    def top(ctx: Any) -> None: ...

    @flow.step(after=["right"])
    def bottom(ctx: Any) -> None: ...

    @flow.step(after=[top])
    def left(ctx: Any) -> None: ...

    @flow.step(after=[top])
    def right(ctx: Any) -> None: ...

    flow.step("join", after=["left", "right"])(_noop)

    assert flow.topological_order() == ["top", "left", "right", "bottom", "join"]
    assert flow.dependents("top") == ("left", "right")
    assert flow.dependents("right") == ("bottom", "join")
    assert flow.dependents("join") == ()
    assert flow.dependencies("join") == ("left", "right")
    with pytest.raises(KeyError):
        flow.dependents("nope")
    with pytest.raises(KeyError):
        flow.dependencies("nope")


def test_order_prefers_definition_order_among_ready(flow: Workflow) -> None:
    flow.step("x", after=["late"])(_noop)
    flow.step("y")(_noop)
    flow.step("late")(_noop)
    flow.step("z", after=["late"])(_noop)
    # x waits for late; among the ready ones the earlier-defined goes first.
    assert flow.topological_order() == ["y", "late", "x", "z"]


def test_order_is_recomputed_after_adding_a_step(flow: Workflow) -> None:
    flow.step("a")(_noop)
    assert flow.topological_order() == ["a"]
    flow.step("b", after=["c"])(_noop)
    with pytest.raises(UnknownDependencyError):
        flow.topological_order()
    flow.step("c")(_noop)
    assert flow.topological_order() == ["a", "c", "b"]


def test_empty_workflow_is_valid(flow: Workflow) -> None:
    flow.validate()
    assert flow.topological_order() == []


def test_long_chain_does_not_recurse(flow: Workflow) -> None:
    for i in range(2000):
        flow.step(f"s{i}", after=[f"s{i + 1}" if i < 1999 else "end"])(_noop)
    with pytest.raises(CycleError) as info:
        flow.step("end", after=["s0"])(_noop)
    assert len(info.value.cycle) == 2002
    assert info.value.cycle[0] == info.value.cycle[-1] == "s0"
    flow.step("end")(_noop)
    order = flow.topological_order()
    assert order[0] == "end"
    assert order[-1] == "s0"


# --- input validation ---------------------------------------------------------------------


class Order(pydantic.BaseModel):
    url: str
    count: int = 1
    tags: frozenset[str] = frozenset()


def test_validate_input_returns_json_form(names: list[str]) -> None:
    names.append("test-dag-input")
    flow = Workflow("test-dag-input", input_model=Order)
    assert flow.input_model is Order
    assert flow.validate_input({"url": "u", "count": "3"}) == {
        "url": "u",
        "count": 3,
        "tags": [],
    }
    assert flow.validate_input(Order(url="v")) == {"url": "v", "count": 1, "tags": []}


def test_validate_input_error(names: list[str]) -> None:
    names.append("test-dag-input-bad")
    flow = Workflow("test-dag-input-bad", input_model=Order)
    with pytest.raises(InputValidationError) as info:
        flow.validate_input({"count": "many"})
    assert info.value.workflow == "test-dag-input-bad"
    assert "url: Field required" in info.value.detail
    assert "count:" in info.value.detail
    assert isinstance(info.value.__cause__, pydantic.ValidationError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputValidationError, match=r"\(root\)"):
        flow.validate_input("not an object")


def test_validate_input_without_model_passes_value_through(flow: Workflow) -> None:
    value = {"anything": [1, 2]}
    assert flow.validate_input(value) is value


# --- registry -----------------------------------------------------------------------------


def test_workflow_registers_itself(flow: Workflow) -> None:
    assert registry.lookup(flow.name) is flow
    assert registry.registered()[flow.name] is flow


def test_reregistering_replaces(names: list[str]) -> None:
    names.append("test-dag-reload")
    first = Workflow("test-dag-reload")
    second = Workflow("test-dag-reload")
    assert first is not second
    assert registry.lookup("test-dag-reload") is second


def test_lookup_unknown() -> None:
    with pytest.raises(WorkflowNotFoundError) as info:
        registry.lookup("test-dag-never-defined")
    assert info.value.workflow == "test-dag-never-defined"
    assert isinstance(info.value, NotFoundError)
    assert isinstance(info.value, LookupError)


def test_registered_is_a_copy(flow: Workflow) -> None:
    snapshot = registry.registered()
    snapshot.pop(flow.name)
    snapshot["test-dag-fake"] = object()
    assert registry.lookup(flow.name) is flow
    with pytest.raises(WorkflowNotFoundError):
        registry.lookup("test-dag-fake")


def test_register_arbitrary_definition_and_unregister() -> None:
    marker = object()
    registry.register("test-dag-object", marker)
    try:
        assert registry.lookup("test-dag-object") is marker
    finally:
        registry.unregister("test-dag-object")
    with pytest.raises(WorkflowNotFoundError):
        registry.lookup("test-dag-object")
    registry.unregister("test-dag-object")  # absent: no error


def test_find_cycle_helper_on_any_graph() -> None:
    from stepflow.dag import _find_cycle

    assert _find_cycle({"a": (), "b": ("a",), "c": ("a", "b", "missing")}) is None
    # b -> c -> d -> b in running order; "a" leads into the cycle but is not part of it.
    graph = {"a": ("d",), "b": ("d",), "c": ("b",), "d": ("c",)}
    assert _find_cycle(graph) == ["b", "c", "d", "b"]
    assert _find_cycle(graph, roots=["c"]) == ["b", "c", "d", "b"]
    assert _find_cycle({"x": ("x",)}) == ["x", "x"]
