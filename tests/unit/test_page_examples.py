"""The product page's Quick Start runs as written (issue 10), and every ambiguous use of the
step declaration forms is an error that says what to write instead."""

from __future__ import annotations

import types
import uuid

import pytest

from sagaz import DAGSaga, Retry, Saga, SagaContext, SagaDefinitionError, SagaStatus, Step
from sagaz.participant import Participant
from streams.config import ConfigError, load_sagas
from tests.page_examples import basic_saga, basic_saga_failing, dag_saga

# -- the snippets


async def test_basic_saga_runs_as_written_and_completes():
    result = await basic_saga.main()
    assert result.status is SagaStatus.COMPLETED
    assert result.results == {"reserve_inventory": "inv-123"}
    assert result.context == {"order_id": "123", "amount": 99.99, "inventory_id": "inv-123"}
    assert basic_saga.inventory_service.calls == [("reserve", "123")]
    assert basic_saga.saga.name == "tests.page_examples.basic_saga"
    assert list(basic_saga.saga.steps) == ["reserve_inventory"]
    assert basic_saga.saga.steps["reserve_inventory"].compensation_fn is \
        basic_saga.release_inventory


async def test_basic_saga_compensates_on_failure():
    result = await basic_saga_failing.main()
    assert result.status is SagaStatus.COMPENSATED
    assert "card declined for 99.99" in str(result.error)
    assert basic_saga_failing.inventory_service.calls == [("reserve", "123"),
                                                          ("release", "inv-123")]
    assert list(basic_saga_failing.saga.steps) == ["reserve_inventory", "charge_payment"]


async def test_dag_runs_the_first_two_in_parallel_and_the_third_after_both():
    dag_saga.spans.clear()
    result = await dag_saga.main()
    assert result.status is SagaStatus.COMPLETED
    (a0, a1), (b0, b1) = dag_saga.spans["check_inventory"], dag_saga.spans["validate_address"]
    assert a0 < b1 and b0 < a1, "check_inventory and validate_address did not overlap"
    assert dag_saga.spans["reserve_items"][0] >= max(a1, b1)
    assert result.results["reserve_items"] == "reserve_items"


# -- helpers: a fresh module per test (the module-level form is per module)


def module(src: str) -> types.ModuleType:
    mod = types.ModuleType(f"page_example_{uuid.uuid4().hex}")
    exec(compile(src, f"<{mod.__name__}>", "exec"), mod.__dict__)
    return mod


HEAD = """
from sagaz import DAGSaga, Retry, Saga

async def ok(ctx):
    return 1

"""


def test_module_form_takes_options_and_names_the_saga_after_its_module():
    mod = module(HEAD + """
@Saga.step(retry=Retry(attempts=3), timeout=5)
async def first(ctx):
    return 1

@Saga.step("second", depends_on=["first"], compensation=ok)
async def two(ctx):
    return 2

saga = DAGSaga()
""")
    saga = mod.saga
    assert isinstance(saga, DAGSaga) and saga.name == mod.__name__ and not saga.name_given
    assert list(saga.steps) == ["first", "second"]
    assert saga.steps["first"].retry.attempts == 3 and saga.steps["first"].saga is saga
    assert saga.steps["second"].compensation_fn is mod.ok


def test_a_reloaded_module_builds_its_saga_again():
    src = HEAD + "@Saga.step\nasync def a(ctx): ...\n@Saga.step\nasync def b(ctx): ...\n" \
                 "saga = Saga()\n"
    mod = module(src)
    first = mod.saga
    exec(compile(src, "<reload>", "exec"), mod.__dict__)  # what importlib.reload does
    assert mod.saga is not first and list(mod.saga.steps) == ["a", "b"]
    assert mod.saga.steps["a"].saga is mod.saga and first.steps["a"].saga is first


def test_module_form_with_a_name_is_stable_for_kafka():
    mod = module(HEAD + """
@Saga.step
async def first(ctx):
    return 1

saga = Saga("order")
""")
    assert mod.saga.kafka_name() == "order" and list(mod.saga.steps) == ["first"]


@pytest.mark.parametrize(
    ("src", "message"),
    [
        (HEAD + "@Saga.step\nasync def a(ctx): ...\nsaga = Saga()\nother = Saga('other')\n",
         r"already built its saga .*saga 'page_example_\w+' built at .*builds one Saga\(\), "
         r"once.*saga = Saga\(\"name\"\)"),
        (HEAD + "@Saga.step\nasync def a(ctx): ...\nsaga = Saga()\n"
                "def build():\n    return Saga()\nbuild()\n",
         "already built its saga"),
        (HEAD + "@Saga.step\nasync def a(ctx): ...\nsaga = Saga()\n"
                "@Saga.step\nasync def b(ctx): ...\n",
         r"@Saga.step on 'b' after module .* built its saga .*declare every @Saga.step "
         r"before that Saga\(\)"),
        (HEAD + "def build():\n    @Saga.step\n    async def a(ctx): ...\nbuild()\n",
         r"@Saga.step on 'a' inside a function: it would belong to no saga; write saga = "
         r"Saga\(\"name\"\)"),
        (HEAD + "@DAGSaga.step\nasync def a(ctx): ...\n",
         r"@DAGSaga.step on module-level function 'a': the module-level form is @Saga.step"),
        (HEAD + "@Saga.step(retries=3)\nasync def a(ctx): ...\n",
         r"unknown option\(s\) retries"),
        (HEAD + "@Saga.step\nasync def a(ctx): ...\n@Saga.step('a')\nasync def b(ctx): ...\n",
         "already declares a step named 'a'"),
        (HEAD + "def a(ctx): ...\nSaga.step(a)\n",
         r"step 'a' of module page_example_\w+: action .* must be an async function"),
        (HEAD + "@Saga.step\nasync def a(ctx): ...\n"
                "class OrderSaga(Saga):\n    @Saga.step\n    async def b(ctx): ...\n"
                "saga = OrderSaga()\n",
         "OrderSaga declares its steps in its class body, but module .* also declares "
         r"@Saga.step steps \(a\).*keep one form"),
    ],
)
def test_ambiguous_uses_are_errors_that_say_what_to_write(src, message):
    with pytest.raises(SagaDefinitionError, match=message):
        module(src)


async def test_a_saga_built_before_the_module_steps_says_so_when_it_runs():
    mod = module(HEAD + "saga = Saga('early')\n@Saga.step\nasync def late(ctx): ...\n")
    with pytest.raises(SagaDefinitionError, match=r"declares steps with @Saga.step \(late\) "
                                                  r"that no Saga\(\) took; saga 'early' was "
                                                  r"built before them"):
        await mod.saga.execute()


async def test_a_nameless_saga_without_steps_cannot_run():
    mod = module(HEAD + "saga = Saga()\n")
    assert mod.saga.name == mod.__name__
    with pytest.raises(SagaDefinitionError, match=r"built without a name\) has no steps: "
                                                  r"@Saga.step steps are taken only by"):
        await mod.saga.execute()


# -- the class form


async def test_class_form_steps_belong_to_the_class_and_each_instance_gets_its_own():
    log: list[str] = []

    class OrderSaga(Saga):
        @Saga.step(retry=Retry(attempts=2))
        async def reserve(ctx):
            log.append(f"reserve {ctx.order_id}")
            return "r-1"

        @reserve.compensation
        async def release(ctx):
            log.append("release")

        @Saga.step
        async def charge(ctx):
            raise RuntimeError("declined")

    class Named(OrderSaga):
        name = "order"

        @Saga.step
        async def ship(ctx):
            return None

    one, two = OrderSaga(), OrderSaga()
    assert one.name == "OrderSaga" and not one.name_given
    assert list(one.steps) == ["reserve", "charge"]
    assert one.steps["reserve"] is not two.steps["reserve"]
    assert one.steps["reserve"].saga is one and one.steps["reserve"].retry.attempts == 2
    result = await one.execute(order_id="o1")
    assert result.status is SagaStatus.COMPENSATED and log == ["reserve o1", "release"]
    named = Named()
    assert named.kafka_name() == "order" and list(named.steps) == ["reserve", "charge", "ship"]
    two.add_step("extra", OrderSaga.reserve.action)  # an instance is still open to more steps
    assert "extra" not in OrderSaga().steps


def test_class_form_in_a_class_that_is_not_a_saga_is_an_error():
    with pytest.raises(Exception) as caught:  # 3.11 wraps __set_name__ errors in RuntimeError
        class Orders:
            @Saga.step
            async def reserve(ctx):
                return None

    err = caught.value if isinstance(caught.value, SagaDefinitionError) \
        else caught.value.__cause__
    assert isinstance(err, SagaDefinitionError)
    assert "class" in str(err) and "Orders, which is not a Saga" in str(err)
    assert "`class Orders(Saga):`" in str(err)


# -- names


def test_name_defaults_and_kafka_needs_a_given_name():
    assert Saga("order").name_given and Saga("order").kafka_name() == "order"
    anonymous = Saga()
    assert anonymous.name == __name__ and not anonymous.name_given
    with pytest.raises(SagaDefinitionError, match=rf"saga '{__name__}' has no name of its own "
                                                  r"\(its name defaults to its module\): over "
                                                  r"Kafka a saga needs a stable name"):
        anonymous.kafka_name()
    with pytest.raises(SagaDefinitionError, match="name must be a non-empty str"):
        Saga("")


def test_kafka_entry_points_refuse_a_default_name():
    anonymous = Saga()
    anonymous.add_step("a", basic_saga.reserve_inventory.action)
    with pytest.raises(SagaDefinitionError, match="over Kafka a saga needs a stable name"):
        Participant("svc", [anonymous], bootstrap="127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"'tests.page_examples.basic_saga:saga': saga "
                                          r"'tests.page_examples.basic_saga' has no name of "
                                          r"its own"):
        load_sagas(["tests.page_examples.basic_saga:saga"])


# -- add_step is awaitable, and still synchronous


async def test_add_step_returns_the_step_and_can_be_awaited():
    saga = Saga("x")
    sync = saga.add_step("a", basic_saga.reserve_inventory.action)
    awaited = await saga.add_step("b", basic_saga.reserve_inventory.action)
    assert isinstance(sync, Step) and isinstance(awaited, Step)
    assert awaited is saga.steps["b"] and list(saga.steps) == ["a", "b"]


# -- the context


def test_context_reads_data_as_attributes_without_shadowing():
    ctx = SagaContext("id", "s", {"order_id": "123", "get": "a key", "data": 1})
    assert ctx.order_id == "123" and ctx.get("order_id") == "123"
    assert callable(ctx.get) and ctx["get"] == "a key" and ctx.data["data"] == 1
    ctx.set("inventory_id", "i-1")
    assert ctx.inventory_id == "i-1"
    with pytest.raises(AttributeError, match=r"saga context has no key 'amount' \(keys: data, "
                                             r"get, inventory_id, order_id\); "
                                             r"ctx.get\('amount'\) returns None"):
        _ = ctx.amount
    assert not hasattr(ctx, "__deepcopy__") and getattr(ctx, "nope", 7) == 7


async def test_participant_context_reads_the_same():
    """Over Kafka the participant builds the context from the command: same reads."""
    seen: dict[str, object] = {}
    saga = Saga("order")

    @saga.step
    async def reserve(ctx: SagaContext):
        seen["attr"], seen["get"] = ctx.order_id, ctx.get("amount")
        ctx.set("inventory_id", f"inv-{ctx.order_id}")
        return "ok"

    participant = Participant("order", [saga], bootstrap="127.0.0.1:1")
    msg = {"saga_id": "s1", "saga": "order", "step": "reserve", "type": "run", "attempt": 1,
           "command_id": "c1", "data": {"order_id": "123", "amount": 99.99}, "results": {}}
    reply, ok = await participant.execute(msg)
    assert ok and seen == {"attr": "123", "get": 99.99}
    assert b'"inventory_id":"inv-123"' in reply
