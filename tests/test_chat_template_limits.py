"""Chat templates render within a time and a size limit (issue 16 item 3): a template from a
stranger's GGUF cannot hang the process or fill its memory, and ordinary templates render as
before (the sandbox's own refusals unchanged)."""
import time

import jinja2
import pytest

from tests.tiny_gguf import tiny_llama_metadata
from weightstream.engine.errors import ConfigError
from weightstream.engine.formats import chat_template
from weightstream.engine.formats.chat_template import ChatTemplateError, compile_chat_template
from weightstream.engine.formats.tokenizer import Tokenizer

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def short_limit(monkeypatch):
    """A 0.3 s limit, so that the tests of runaway templates stay fast."""
    monkeypatch.setattr(chat_template, "TIME_LIMIT_S", 0.3)
    return 0.3


def render(source, **variables):
    return compile_chat_template(source, "evil.gguf: tokenizer.chat_template").render(**variables)


def timed_error(source, limit, match, **variables):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match) as info:
        render(source, **variables)
    assert time.monotonic() - t0 < limit + 1.5
    assert str(info.value).startswith("evil.gguf: tokenizer.chat_template: ")


def test_a_nested_range_loop_stops_within_the_default_limits():
    """The issue's template used to render without limit (10^10 iterations): here the output limit
    stops it first; with no output (the loops alone), the clock does, at the default 2 s."""
    assert chat_template.TIME_LIMIT_S == 2.0
    timed_error("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                2.0, "time limit|the output would hold")
    timed_error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                2.0, "rendering ran past its time limit of 2 s")


def test_a_nested_loop_over_a_string_with_no_output_stops_too(short_limit):
    """Nothing is yielded to the renderer and no range is involved: the loops check the clock."""
    timed_error("{% for c in 'ab' * 1000 %}{% for d in 'cd' * 100000 %}{% for e in 'ef' * 100000 %}"
                "{% endfor %}{% endfor %}{% endfor %}", short_limit, "time limit")


def test_unbounded_recursion_is_an_error_not_a_crash(short_limit):
    timed_error("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}", short_limit,
                "time limit|RecursionError")


@pytest.mark.parametrize("source,match", [
    ("{{ 'a' * 10**9 }}", r"a repetition \(\*\) would hold 1000000000 items"),
    ("{{ [1, 2] * 10**8 }}", r"a repetition \(\*\) would hold 200000000 items"),
    ("{{ 7 ** 100000000 }}", r"a power \(\*\*\)"),  # jinja's ** is left-associative: no 10**9 here
    ("{{ 'x'.ljust(10**9) }}", r"str.ljust would hold 1000000000 items"),
    ("{{ 'x' | center(10**9) }}", r"the center filter's parameter would hold 1000000000 items"),
    ("{{ 'x' | indent(width=10**8) }}", r"the indent filter's parameter would hold 100000000 items"),
    ("{{ (['ab'] * 1000) | join('c' * 2000) }}", r"the join filter's result would hold 2000000 items"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     r"a concatenation \(~\)"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     r"an operation \(\+\)"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", r"the output would hold \d+ items"),
])
def test_results_over_the_size_limit_are_refused_before_they_are_built(short_limit, source, match):
    timed_error(source, short_limit, match + ".*limit of 1048576 characters")


def test_ordinary_templates_render_as_before():
    source = ("{% for m in messages %}{% if loop.first %}[{{ loop.length }}]{% endif %}<{{ m.role }}>"
              "{{ m.content | trim }}{% if not loop.last %}|{% endif %}{% endfor %}"
              "{% for x in [3, 0, 5] if x %}{{ x }}{% else %}none{% endfor %}"
              "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"
              "{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ '%s!' % 'ok' }}{{ 'x' ~ 1 }}{{ tools | tojson }}{{ 10**9 | string | length }}"
              "{% for item in tree recursive %}{{ item.name }}{{ loop(item.children) }}{% endfor %}")
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    tree = [{"name": "a", "children": [{"name": "b", "children": []}]}]
    assert render(source, messages=messages, tools=None, tree=tree) == \
        "[2]<user>hi|<assistant>yo35" + "3" + "abab1024ok!x1null10ab"


def test_the_sandbox_still_refuses_and_raise_exception_still_raises():
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ messages.__class__.__mro__ }}", messages=[])
    with pytest.raises(jinja2.exceptions.TemplateError, match="no way"):
        render("{{ raise_exception('no way') }}")


def test_a_template_that_does_not_parse_is_named():
    with pytest.raises(ChatTemplateError, match=r"evil.gguf: tokenizer.chat_template: not a valid Jinja2 template"):
        render("{% for %}")


def test_the_tokenizer_renders_through_the_limits_naming_its_file(short_limit):
    meta = {**tiny_llama_metadata(), "tokenizer.chat_template": "{% for i in range(100000) %}{% for j in "
                                                               "range(100000) %}{% endfor %}{% endfor %}"}
    tok = Tokenizer.from_metadata(meta, source="m.gguf")
    with pytest.raises(ChatTemplateError, match="m.gguf: tokenizer.chat_template: rendering ran past") as info:
        tok.apply_chat_template(HI)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    ok = Tokenizer.from_metadata({**meta, "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}"
                                                                     "{% endfor %}"})
    assert ok.apply_chat_template(HI) == "hi"
