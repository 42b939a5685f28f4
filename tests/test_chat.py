"""qwen_edu.chat against the official Qwen2.5-Instruct Jinja template (rendered like transformers does)."""
import json, random
from pathlib import Path
import pytest
from qwen_edu.chat import apply_chat_template, parse_assistant_message, parse_tool_calls, DEFAULT_SYSTEM_PROMPT

jinja2 = pytest.importorskip('jinja2')
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE = (Path(__file__).parents[1] / 'data' / 'qwen2.5_chat_template.jinja').read_text()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@pytest.fixture(scope='module')
def official():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters['tojson'] = _tojson
    t = env.from_string(TEMPLATE)
    return lambda m, tools=None, gp=False: t.render(messages=m, tools=tools, add_generation_prompt=gp)


WEATHER = {'type': 'function', 'function': {'name': 'get_weather', 'description': 'Current weather — météo',
           'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}, 'unit': {'enum': ['C', 'F']}},
                          'required': ['city']}}}
SEARCH = {'type': 'function', 'function': {'name': 'search', 'description': '检索', 'parameters': {
          'type': 'object', 'properties': {'q': {'type': 'string'}, 'k': {'type': 'integer'}}}}}
TEXTS = ['Hi!', '', 'Line one\nline two\n', '你好，世界 🌍', '  spaced  ', 'quote "x" and {braces}', 'tab\tand\r\nCRLF',
         '<tool_call> in text', 'ends with newline\n']


def random_conversation(rnd: random.Random):
    msgs = []
    if rnd.random() < 0.5: msgs.append({'role': 'system', 'content': rnd.choice(TEXTS)})
    for _ in range(rnd.randrange(1, 6)):
        msgs.append({'role': 'user', 'content': rnd.choice(TEXTS)})
        if rnd.random() < 0.15: msgs.append({'role': 'system', 'content': rnd.choice(TEXTS)})
        if rnd.random() < 0.5:
            calls = []
            for _ in range(rnd.randrange(1, 4)):
                call = {'name': rnd.choice(['get_weather', 'search']),
                        'arguments': rnd.choice([{}, {'city': 'Paris'}, {'q': '北京', 'k': 3, 'deep': {'a': [1, None, True]}}])}
                calls.append({'type': 'function', 'function': call} if rnd.random() < 0.7 else call)
            msgs.append({'role': 'assistant', 'content': rnd.choice(['', None, 'Checking.', 'Let me look.\n']), 'tool_calls': calls})
            for _ in range(rnd.randrange(1, 4)):
                msgs.append({'role': 'tool', 'content': rnd.choice(['{"temp": 21}', 'no result', '结果\n2 lines'])})
        if rnd.random() < 0.8: msgs.append({'role': 'assistant', 'content': rnd.choice(TEXTS)})
    return msgs


def test_matches_official_template_on_many_conversations(official):
    rnd = random.Random(0)
    for _ in range(400):
        msgs = random_conversation(rnd)
        tools = rnd.choice([None, [], [WEATHER], [WEATHER, SEARCH]])
        gp = rnd.random() < 0.5
        assert apply_chat_template(msgs, tools, gp) == official(msgs, tools, gp), msgs


def test_default_system_prompt_and_layout(official):
    s = apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True)
    assert s == f'<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    assert DEFAULT_SYSTEM_PROMPT == 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'


def test_consecutive_tool_messages_share_one_user_turn(official):
    msgs = [{'role': 'user', 'content': 'q'},
            {'role': 'assistant', 'content': None, 'tool_calls': [{'name': 'f', 'arguments': {'x': 1}}]},
            {'role': 'tool', 'content': 'a'}, {'role': 'tool', 'content': 'b'}, {'role': 'tool', 'content': 'c'}]
    s = apply_chat_template(msgs, [WEATHER])
    assert s == official(msgs, [WEATHER])
    assert s.count('<|im_start|>user') == 2 and s.count('<tool_response>') == 3
    assert s.endswith('<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response>'
                      '\n<tool_response>\nc\n</tool_response><|im_end|>\n')
    # tool messages at the very start are grouped too
    msgs2 = [{'role': 'tool', 'content': 'x'}, {'role': 'tool', 'content': 'y'}, {'role': 'user', 'content': 'z'}]
    assert apply_chat_template(msgs2) == official(msgs2)


def test_string_arguments_are_json_encoded_like_the_template(official):
    msgs = [{'role': 'user', 'content': 'q'},
            {'role': 'assistant', 'content': '', 'tool_calls': [{'function': {'name': 'f', 'arguments': '{"x": 1}'}}]}]
    assert apply_chat_template(msgs) == official(msgs)


def test_transformers_apply_chat_template_agrees(tmp_path):
    transformers = pytest.importorskip('transformers')
    from qwen_edu.tokenizer import BPETokenizer
    BPETokenizer.train('tiny corpus for a tiny tokenizer', 300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>']).save_hf(tmp_path)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    tok.chat_template = TEMPLATE
    rnd = random.Random(1)
    for _ in range(40):
        msgs = random_conversation(rnd)
        tools = rnd.choice([None, [WEATHER, SEARCH]])
        gp = rnd.random() < 0.5
        ref = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gp, tokenize=False)
        assert apply_chat_template(msgs, tools, gp) == ref


def test_parse_round_trip():
    prompt_msgs = [{'role': 'user', 'content': 'Weather in Paris?'}]
    prompt = apply_chat_template(prompt_msgs, [WEATHER], add_generation_prompt=True)
    for gen in ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
                '\n<tool_call>\n{"name": "search", "arguments": {"q": "天气"}}\n</tool_call>',
                'No tools needed.']:
        msg = parse_assistant_message(gen + '<|im_end|>')
        assert apply_chat_template(prompt_msgs + [msg], [WEATHER]) == prompt + gen + '<|im_end|>\n'
    assert parse_tool_calls('x <tool_call>{"name": "a"}</tool_call>') == [{'name': 'a', 'arguments': {}}]
    assert parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"b": 1}}') == []  # unfinished: not a call yet


def test_bad_input_errors():
    with pytest.raises(ValueError, match='non-empty list'): apply_chat_template([])
    with pytest.raises(ValueError, match='non-empty list'): apply_chat_template('hello')
    with pytest.raises(TypeError, match='must be a dict'): apply_chat_template(['hello'])
    with pytest.raises(ValueError, match='role must be one of'): apply_chat_template([{'role': 'function', 'content': 'x'}])
    with pytest.raises(ValueError, match='content must be a str'): apply_chat_template([{'role': 'user'}])
    with pytest.raises(ValueError, match='content must be a str'): apply_chat_template([{'role': 'tool', 'content': {'a': 1}}])
    # a non-str system prompt used to be rendered as the text 'None' (or fail inside string concatenation with tools)
    for tools in (None, [WEATHER]):
        with pytest.raises(ValueError, match=r'messages\[0\] \(system\): content must be a str'):
            apply_chat_template([{'role': 'system', 'content': None}, {'role': 'user', 'content': 'x'}], tools)
    with pytest.raises(TypeError, match='expects a str'): parse_assistant_message(None)
    with pytest.raises(TypeError, match='tools must be a list'): apply_chat_template([{'role': 'user', 'content': 'x'}], tools=[print])
    with pytest.raises(ValueError, match="needs a 'name'"):
        apply_chat_template([{'role': 'assistant', 'content': '', 'tool_calls': [{'function': {'name': 'f'}}]}])
    with pytest.raises(ValueError, match='not valid JSON'): parse_tool_calls('<tool_call>{"name": f}</tool_call>')
    with pytest.raises(ValueError, match="with a 'name'"): parse_tool_calls('<tool_call>[1, 2]</tool_call>')
    with pytest.raises(TypeError, match='expects a str'): parse_tool_calls(None)
