"""Chat templates (Jinja2 source from a GGUF's tokenizer.chat_template) compiled as transformers
compiles them, in jinja2's ImmutableSandboxedEnvironment, and rendered within a time and a size
limit.

A template comes from whoever wrote the file (llama-cpp-python's CVE-2024-34359 ran code from
one): the sandbox keeps it from reaching Python's internals, and the limits keep it from hanging
the process or filling its memory. Rendering runs on the calling thread (a thread cannot be
killed), so the template is made to check the clock itself, at every point where it could loop
or grow without end:
- every `{% for %}` iterates through a counted iterator (the parsed template is rewritten so), so
  nested loops over range(100000) stop at the deadline, output or not; so does every call
  (macros, methods, `range`), which also bounds recursion;
- `~` (string concatenation) and the `+`, `*`, `**`, `%` operators refuse results over the size
  limit, `*` and `**` before they allocate them, and str's padding methods and every filter refuse
  an integer parameter (a width, a count) over it, so a loop doubling a string cannot reach
  gigabytes in the few steps it takes, nor can `center(10**9)`;
- the output is produced chunk by chunk (Template.generate), its size and the clock checked per chunk.
What stays unbounded: a single builtin call working on data already within the limits (e.g.
str.replace multiplying a 1 Mi string by a 1 Mi replacement) allocates once before its result is
checked.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from datetime import datetime
from typing import Any

from ..errors import ConfigError

TIME_LIMIT_S = 2.0  # per render; transformers' templates render in well under a millisecond
MAX_CHARS = 1 << 20  # output and any one string or list built on the way (1 Mi characters)
_COUNTED_ITER = "ws_counted_iter"  # the rewritten loops' and concatenations' helpers (template globals)
_CONCAT = "ws_concat"
_PADDING = ("ljust", "rjust", "center", "zfill", "expandtabs")


class ChatTemplateError(ConfigError):
    """A chat template that is not a string, or whose rendering ran past its time or size limit:
    names the template's file and the limit."""


class _Budget:
    """One render's limits: the deadline and the size every intermediate result must stay under."""

    def __init__(self, what: str, seconds: float, max_chars: int):
        self.what, self.seconds, self.max_chars = what, seconds, max_chars
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"{self.what}: rendering ran past its time limit of {self.seconds:g} s "
                                    "(a loop or recursion without end?)")

    def size(self, n: int, how: str) -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"{self.what}: {how} would hold {n} items, over the limit of "
                                    f"{self.max_chars} characters")

    def result(self, value: Any, how: str) -> Any:
        if isinstance(value, (str, bytes, list, tuple)):
            self.size(len(value), how)
        elif isinstance(value, int):
            self.size(value.bit_length() // 8, how)
        return value


def _sandbox_class():
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class Rewrite(NodeTransformer):
        """Loops iterate through ws_counted_iter(...), concatenations become ws_concat(...)."""

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = nodes.Call(nodes.Name(_COUNTED_ITER, "load"), [node.iter], [], None, None).set_lineno(node.lineno)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return nodes.Call(nodes.Name(_CONCAT, "load"), node.nodes, [], None, None).set_lineno(node.lineno)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def __init__(self, **kw):
            super().__init__(**kw)
            self._local = threading.local()  # the render in progress on each thread: its _Budget
            self.globals[_COUNTED_ITER] = self._counted
            self.globals[_CONCAT] = self._concat

        @property
        def budget(self) -> _Budget:
            return self._local.budget

        def _parse(self, source, name, filename):
            return Rewrite().visit(super()._parse(source, name, filename))

        def _counted(self, iterable):
            budget = self.budget
            for item in iterable:
                budget.tick()
                yield item

        def _concat(self, *parts):
            budget = self.budget
            budget.size(sum(len(p) if isinstance(p, str) else 0 for p in parts), "a concatenation (~)")
            return "".join(map(str, parts))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            budget = __self.budget
            budget.tick()
            if getattr(__obj, "__name__", None) in _PADDING and isinstance(getattr(__obj, "__self__", None), str):
                for width in (*args, *kwargs.values()):
                    if isinstance(width, int):
                        budget.size(width, f"str.{__obj.__name__}")
            return budget.result(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def bound_filters(self) -> None:
            """Every filter ticks the clock, refuses an integer parameter (a width, a count) over
            the size limit (`center(10**9)` would allocate a GiB before its result is seen) and
            has its result size-checked. The filtered value itself is not a parameter."""
            for name, f in list(self.filters.items()):
                self.filters[name] = _bounded_filter(self, name, f)

        def call_binop(self, context, operator, left, right):
            budget = self.budget
            budget.tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        budget.size(len(seq) * max(n, 0), "a repetition (*)")
                if isinstance(left, int) and isinstance(right, int):
                    budget.size((left.bit_length() + right.bit_length()) // 8, "a product (*)")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                budget.size(right * max(left.bit_length() - 1, 0) // 8, "a power (**)")
            return budget.result(super().call_binop(context, operator, left, right), f"an operation ({operator})")

    return jinja2, BoundedSandbox


def _bounded_filter(env, name: str, f):
    """The filter f, checked as BoundedSandbox.bound_filters says."""
    # jinja passes the context, eval context or environment first to filters marked so
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(f)  # keeps jinja_pass_arg
    def bounded(*args, **kwargs):
        budget = env.budget
        budget.tick()
        for value in (*args[skip:], *kwargs.values()):
            if isinstance(value, int):
                budget.size(value, f"the {name} filter's parameter")
        return budget.result(f(*args, **kwargs), f"the {name} filter's result")

    return bounded


def compile_chat_template(source: str, what: str = "chat template"):
    """A ChatTemplate for the Jinja2 source, compiled as transformers does (its
    _compile_jinja_template): trim_blocks/lstrip_blocks, loop controls, `{% generation %}`,
    `raise_exception`, `strftime_now` and a `tojson` that does not escape HTML. what: the
    template's name in errors (its file and key)."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"{what}: expected a string (Jinja2 source), found {type(source).__name__}")
    jinja2, BoundedSandbox = _sandbox_class()
    from jinja2.ext import Extension, loopcontrols

    class GenerationTag(Extension):
        # transformers marks assistant spans with {% generation %}...{% endgeneration %}; render the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.bound_filters()
    try:
        return ChatTemplate(env, env.from_string(source), what)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{what}: not a valid Jinja2 template: {e}") from e


class ChatTemplate:
    """A compiled template; render() holds it to TIME_LIMIT_S and MAX_CHARS (module attributes,
    read at each render)."""

    def __init__(self, env, template, what: str):
        self._env, self._template, self.what = env, template, what

    def render(self, **variables: Any) -> str:
        budget = _Budget(self.what, TIME_LIMIT_S, MAX_CHARS)
        local = self._env._local
        outer = getattr(local, "budget", None)  # a template rendered while another renders (reentrant)
        local.budget = budget
        out: list[str] = []
        n = 0
        try:
            for chunk in self._template.generate(**variables):
                n += len(chunk)
                budget.size(n, "the output")
                budget.tick()
                out.append(chunk)
        except (RecursionError, MemoryError, OverflowError) as e:
            raise ChatTemplateError(f"{self.what}: rendering failed: {type(e).__name__}: {e}") from e
        finally:
            local.budget = outer
        return "".join(out)
