from safactory.policy.chat import assistant_text, parse_json_tool_calls, parse_tool_calls
from safactory.sim.envs.arith import ANSWER, CALC
from safactory.types import Message, ToolCall, ToolSpec

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


def test_tool_names_may_hold_dots_and_hyphens_as_mcp_servers_name_them():
    tools = [ToolSpec(name="get-sum"), ToolSpec(name="fs.read_file")]
    calls, err = parse_tool_calls('get-sum({"a": 1, "b": 2})\nfs.read_file(/tmp/x)', tools)
    assert err is None and [c.name for c in calls] == ["get-sum", "fs.read_file"]
    assert calls[0].arguments == {"a": 1, "b": 2} and calls[1].arguments == {"arg": "/tmp/x"}


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


def test_malformed_json_in_tool_calls_is_a_parse_error_never_an_exception():
    deep, huge = "[" * 5000, "9" * 5000  # past the recursion limit, past the int-digit limit
    assert parse_json_tool_calls(deep) is None  # not a JSON call: a plain reply
    for text in ("<tool_call>" + deep, '{"name": "calc", "arguments": {"x": ' + huge + "}}"):
        calls, err = parse_json_tool_calls(text)
        assert calls == [] and "malformed tool call JSON" in (err or "")
    for inner in ('{"x": ' + huge + "}", '{"x": ' + deep + "}"):  # not JSON: the plain argument
        calls, err = parse_tool_calls(f"calc({inner})", TOOLS)
        assert err is None and calls[0].arguments == {"expression": inner}
    bad_schema = ToolSpec(name="calc", parameters={"type": "object", "properties": None, "required": 5})
    calls, err = parse_tool_calls("calc(1+2)", [bad_schema])
    assert err is None and calls[0].arguments == {"arg": "1+2"}
