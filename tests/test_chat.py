from safactory.policy.chat import assistant_text, parse_tool_calls
from safactory.sim.envs.arith import ANSWER, CALC
from safactory.types import Message, ToolCall

TOOLS = [CALC, ANSWER]


def test_parse_plain_calls_map_to_first_parameter():
    calls, err = parse_tool_calls("calc(12+7*3)", TOOLS)
    assert err is None and calls[0].name == "calc" and calls[0].arguments == {"expression": "12+7*3"}
    calls, err = parse_tool_calls(' answer({"value": "5"}) ', TOOLS)
    assert err is None and calls[0].arguments == {"value": "5"}
    calls, err = parse_tool_calls("calc(1)\nanswer(1)", TOOLS)
    assert [c.name for c in calls] == ["calc", "answer"]


def test_parse_failures_are_reported_not_raised():
    for text in ("", "calc(1+2", "the answer is 4", "calc(1) and more"):
        calls, err = parse_tool_calls(text, TOOLS)
        assert calls == [] and err


def test_unknown_tool_parses_so_the_env_can_answer_it():
    calls, err = parse_tool_calls("sqrt(4)", TOOLS)
    assert err is None and calls[0].name == "sqrt" and calls[0].arguments == {"arg": "4"}


def test_render_is_incremental_and_masks_assistant_tokens(chat):
    tok = chat.tokenizer
    user = Message(role="user", content="Compute 3+4.")
    first = chat.prompt_ids([user])
    action = Message(role="assistant", content="calc(3+4)")
    completion = tok.encode("calc(3+4)") + [tok.eos_id]
    second = chat.prompt_ids([user, action, Message(role="tool", content="7")])
    assert second[: len(first) + len(completion)] == first + completion
    ids, mask = chat.render([user, action])
    assert [i for i, m in zip(ids, mask, strict=True) if m] == completion


def test_assistant_text_from_structured_calls():
    msg = Message(role="assistant", tool_calls=[ToolCall(id="a", name="calc", arguments={"expression": "1+1"})])
    assert assistant_text(msg) == "calc(1+1)"
