"""agent.yaml loading under arbitrary input: only ConfigError ever escapes, one `file:line: ` line per problem.

Inputs: structures dumped to YAML (free-form and shaped like the schema), the shipped example mutated,
YAML punctuation soup, and arbitrary bytes. Derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import config
from agent.config import ConfigError
from agent.config_cli import is_configured
from agent.config_doc import describe
from tests.conftest import REPO

# Each case must finish well inside the deadline; the module takes about 6 s of CPU.
FUZZ = settings(max_examples=100, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(FUZZ, max_examples=300)  # inputs that mostly fail early

SHAPE = re.compile(r"agent\.yaml:[1-9][0-9]*: \S")

EXAMPLE = (REPO / "packaging" / "agent.yaml.example").read_text()
# The example with its commented-out keys switched on: most of the schema, nearly valid.
UNCOMMENTED = re.sub(r"^(\s*)# (\w+:)", r"\1\2", EXAMPLE, flags=re.M)

KEYS = sorted({part for k in describe(config.Config) for part in k.path.split(".")})
YAML_PUNCTUATION = "[]{}:,-?&*!|>'\"#%@`~ \n\t\\.0123456789abcxyz"


def assert_only_config_errors(text: str | bytes) -> None:
    try:
        if isinstance(text, bytes):
            config.parse_bytes(text, "agent.yaml")
        else:
            config.parse(text, "agent.yaml")
    except ConfigError as exc:
        lines = str(exc).split("\n")
        assert str(exc).splitlines() == lines, "a problem spans more than one line"
        assert len(lines) == len(exc.errors)
        for line in lines:
            assert SHAPE.match(line), line
    if isinstance(text, str):
        assert isinstance(is_configured(text), bool)


scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(["10s", "500ms", "1m30s", "-1s", "1MiB", "0", "65536", "kubernetes", "http://x",
                              "/x", "istio", "envoy", "10.0.0.300", "::1", "10.0.0.0/8", "a" * 64, "true", "~"]))


def documents(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                        | st.dictionaries(keys, children, max_size=6), max_leaves=30)


@st.composite
def dumped(draw: st.DrawFn, keys: st.SearchStrategy[str]) -> str:
    doc = draw(documents(keys))
    if draw(st.booleans()) and isinstance(doc, dict):
        doc = {"bundle": {"source": "/x"}, **doc}
    return yaml.safe_dump(doc, default_flow_style=draw(st.sampled_from([None, True, False])),
                          allow_unicode=draw(st.booleans()))


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from([EXAMPLE, UNCOMMENTED]))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat", "uncomment", "dedent"]))
        if op == "insert":
            text = text[:i] + draw(st.text(YAML_PUNCTUATION, max_size=8)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + draw(st.text(max_size=8)) + text[j:]
        elif op == "repeat":
            text = text[:j] + text[i:j] * draw(st.integers(2, 50)) + text[j:]
        elif op == "uncomment":
            text = text[:i] + text[i:].replace("# ", "", 1)
        else:
            text = text[:i] + re.sub(r"\n  ", "\n", text[i:j]) + text[j:]
    return text


@FUZZ
@given(dumped(st.text(max_size=12)))
def test_any_yaml_document(text: str) -> None:
    assert_only_config_errors(text)


@FUZZ
@given(dumped(st.sampled_from(KEYS)))
def test_any_document_shaped_like_the_schema(text: str) -> None:
    assert_only_config_errors(text)


@FUZZ
@given(mutated_example())
def test_mutated_example(text: str) -> None:
    assert_only_config_errors(text)


@CHEAP
@given(st.text(YAML_PUNCTUATION, max_size=200))
def test_yaml_punctuation(text: str) -> None:
    assert_only_config_errors(text)


@CHEAP
@given(st.binary(max_size=300) | mutated_example().map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes(data: bytes) -> None:
    assert_only_config_errors(data)
