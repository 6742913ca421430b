# SPDX-License-Identifier: Apache-2.0
"""Checks schema/sandbox.v1.schema.json against the golden spec corpus and the examples.

Run from anywhere with Debian's interpreter: /usr/bin/python3 -m pytest -q tests/acceptance/test_schema.py
(python3-jsonschema 4.10, python3-yaml, tomllib from the standard library).

- The schema is a valid draft-07 schema.
- Every spec in examples/sandboxes/ and tests/data/spec/valid/ (recursively) passes it.
- Every spec in tests/data/spec/invalid/ fails it, at the path its `.expected` file names, unless
  the `.expected` file says `schema: pass` (the error is one a JSON Schema cannot express:
  cross-field rules, interpolation, whole-MiB sizes...; such files must then pass the schema) or
  `schema: skip` (a syntax error: the file must not even parse).
- full.toml, full.yaml and full.json describe the same spec.

The `.expected` format (shared with the C++ decoder tests): first line `LINE:COL: json.path`
(1-based; json.path dotted with [i] for array indexes, `<root>` for the document itself; COL may be
left empty for syntax errors), optional second line `schema: pass` or `schema: skip`.

PyYAML reads YAML 1.1 while the decoder reads YAML 1.2: the corpus avoids the scalars on which the
two differ (yes/no/on/off, sexagesimal numbers such as 1000:1000 unquoted, ...).
"""
import json
import pathlib
import re
import tomllib

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "schema" / "sandbox.v1.schema.json"
EXAMPLES = ROOT / "examples" / "sandboxes"
DATA = ROOT / "tests" / "data" / "spec"
VALID = DATA / "valid"
INVALID = DATA / "invalid"

SPEC_SUFFIXES = {".toml", ".yaml", ".yml", ".json"}
EXPECTED_RE = re.compile(r"^(\d+):(\d*): (\S+)$")


def spec_files(directory, recursive=False):
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in directory.glob(pattern) if p.is_file() and p.suffix in SPEC_SUFFIXES
    )


def load_spec(path):
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            return tomllib.load(f)
    with open(path, encoding="utf-8") as f:
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(f)
        return json.load(f)


def ids(paths):
    return [str(p.relative_to(DATA if DATA in p.parents else ROOT)) for p in paths]


EXAMPLE_FILES = spec_files(EXAMPLES)
VALID_FILES = spec_files(VALID, recursive=True)
INVALID_FILES = spec_files(INVALID)


@pytest.fixture(scope="module")
def schema():
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def validator(schema):
    # Formats (ipv4, ipv6) are annotations in draft 7; checking them here makes the test stricter.
    return jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# The last segment of a dotted path: [3], ["db.local"], .name, or a leading name.
LAST_SEGMENT_RE = re.compile(r'^(.*?)(\[\d+\]|\["(?:[^"\\]|\\.)*"\]|\.?[A-Za-z0-9_-]+)$')


def dotted(path):
    """Renders an error path like the decoder does: a.b[0].c, a["db.local"] for keys that are not
    identifiers, `<root>` for the document."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif IDENTIFIER_RE.match(part):
            out += ("." if out else "") + part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "<root>"


def split_last(path):
    """sandboxes.a.mounts[1].mode -> ("sandboxes.a.mounts[1]", "mode");
    sandboxes.a.mounts[1] -> ("sandboxes.a.mounts", 1); name -> ("<root>", "name")."""
    m = LAST_SEGMENT_RE.match(path)
    assert m and path != "<root>", path
    head, last = m.group(1) or "<root>", m.group(2)
    if last.startswith("[\""):
        return head, json.loads(last[1:-1])
    if last.startswith("["):
        return head, int(last[1:-1])
    return head, last.lstrip(".")


def all_errors(errors):
    for e in errors:
        yield e
        yield from all_errors(e.context)


def read_expected(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert 1 <= len(lines) <= 2, f"{path.name}: one or two lines expected"
    m = EXPECTED_RE.match(lines[0])
    assert m, f"{path.name}: first line must be 'LINE:COL: json.path', got {lines[0]!r}"
    note = None
    if len(lines) == 2:
        assert lines[1] in ("schema: pass", "schema: skip"), f"{path.name}: bad second line"
        note = lines[1].split(": ")[1]
    return int(m.group(1)), m.group(2), m.group(3), note


# ---------------------------------------------------------------------------------------------
# The schema itself


def test_schema_is_valid_draft7(schema):
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["$id"] == "https://matchlock.dev/schema/sandbox.v1.schema.json"
    jsonschema.Draft7Validator.check_schema(schema)


def _walk_properties(node, where="#"):
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            yield f"{where}/properties/{name}", sub
        for key, sub in node.items():
            if key != "if":  # conditions, not hover targets
                yield from _walk_properties(sub, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _walk_properties(sub, f"{where}/{i}")


def test_every_property_has_a_description(schema):
    """Editors show `description` as hover help."""
    missing = [w for w, sub in _walk_properties(schema) if "description" not in sub]
    assert not missing, missing


def test_objects_are_closed(schema):
    """Every spec object rejects unknown keys (x-* extension keys excepted)."""
    defs = schema["definitions"]
    for node in [schema] + [defs[n] for n in
                            ("sandbox", "network", "healthcheck", "secret", "mount", "portForward")]:
        assert node["additionalProperties"] is False
        assert list(node["patternProperties"]) == ["^x-"]


# ---------------------------------------------------------------------------------------------
# Valid specs and examples


def test_corpus_is_not_empty():
    assert len(EXAMPLE_FILES) >= 3
    assert len(VALID_FILES) >= 12
    assert len(INVALID_FILES) >= 25


@pytest.mark.parametrize("path", EXAMPLE_FILES + VALID_FILES, ids=ids(EXAMPLE_FILES + VALID_FILES))
def test_valid_spec_passes_schema(path, validator):
    instance = load_spec(path)
    errors = [f"{dotted(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, "\n".join(errors)


def _normalize_lists(spec):
    """env and labels may be a map or a list of "K=V": compare them as maps of strings."""
    def as_str(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    for sandbox in spec["sandboxes"].values():
        for key in ("env", "labels"):
            value = sandbox.get(key)
            if isinstance(value, list):
                sandbox[key] = dict(item.split("=", 1) for item in value)
            elif isinstance(value, dict):
                sandbox[key] = {k: as_str(v) for k, v in value.items()}
    return spec


def test_full_specs_are_the_same_spec():
    """full.toml, full.yaml and full.json spell the same spec. The only spelling difference allowed
    is env/labels as a map or as a "K=V" list; everything else is written identically."""
    toml_spec = _normalize_lists(load_spec(VALID / "full.toml"))
    yaml_spec = _normalize_lists(load_spec(VALID / "full.yaml"))
    json_spec = _normalize_lists(load_spec(VALID / "full.json"))
    assert yaml_spec == toml_spec
    assert json_spec == toml_spec


def test_full_spec_uses_every_field(schema):
    spec = load_spec(VALID / "full.toml")
    defs = schema["definitions"]
    coder = spec["sandboxes"]["coder"]

    def keys(obj):
        return {k for k in obj if not k.startswith("x-")}

    assert set(schema["properties"]) - {"$schema"} <= keys(spec)  # $schema: editors only
    assert set(defs["sandbox"]["properties"]) <= keys(coder)
    assert set(defs["network"]["properties"]) <= keys(coder["network"])
    assert set(defs["healthcheck"]["properties"]) <= keys(coder["healthcheck"])
    assert set(defs["mount"]["properties"]) <= set().union(*(keys(m) for m in coder["mounts"]))
    assert set(defs["portForward"]["properties"]) <= set().union(*(keys(p) for p in coder["ports"]))
    assert set(defs["secret"]["properties"]) <= set().union(*(keys(s) for s in coder["secrets"]))


# ---------------------------------------------------------------------------------------------
# Invalid specs


def test_every_invalid_file_has_an_expected_file():
    specs = {p.name for p in INVALID_FILES}
    expected = {p.name[: -len(".expected")] for p in INVALID.glob("*.expected")}
    assert specs == expected
    others = {p.name for p in INVALID.iterdir()} - specs - {n + ".expected" for n in expected}
    assert not others, f"unexpected files in invalid/: {sorted(others)}"


@pytest.mark.parametrize("path", INVALID_FILES, ids=ids(INVALID_FILES))
def test_invalid_spec(path, validator):
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") < 20, "keep invalid files small so positions are easy to check"
    line, col, expected_path, note = read_expected(path.with_name(path.name + ".expected"))
    lines = text.splitlines()
    assert line <= len(lines), "the expected line is past the end of the file"
    if col:
        assert int(col) <= len(lines[line - 1]) + 1, "the expected column is past the end of the line"

    if note == "skip":
        # A syntax error: the file must not parse at all.
        with pytest.raises(Exception):
            load_spec(path)
        return

    instance = load_spec(path)
    errors = list(validator.iter_errors(instance))
    if note == "pass":
        # The error is one a JSON Schema cannot express: the schema must accept the file.
        messages = [f"{dotted(e.absolute_path)}: {e.message}" for e in errors]
        assert not messages, "expected to pass the schema:\n" + "\n".join(messages)
        return

    assert errors, f"expected a schema error at {expected_path}"
    # jsonschema reports unknown keys (additionalProperties), bad key names (propertyNames) and
    # conflicts (oneOf) on the containing object, and may report deeper than the decoder: accept
    # the expected path, its parent, or anything below it.
    reported = {dotted(e.absolute_path): e for e in all_errors(errors)}
    at_or_below = [
        r for r in reported
        if r == expected_path or r.startswith(expected_path + ".") or r.startswith(expected_path + "[")
    ]
    if at_or_below:
        return
    up, key = split_last(expected_path) if expected_path != "<root>" else (None, None)
    assert up in reported, (
        f"no schema error at {expected_path} (or its parent); got {sorted(reported)}"
    )
    if isinstance(key, str):
        # Reported on the parent: the message must at least name the key (unknown key, bad key
        # name, conflicting key).
        messages = [e.message for e in all_errors(errors)]
        assert any(repr(key) in m for m in messages), (key, messages)


# ---------------------------------------------------------------------------------------------
# Schema details that the corpus does not pin down on its own


def _sandbox(**fields):
    return {"sandboxes": {"app": {"image": "busybox:latest", **fields}}}


SANDBOX_RULES = [
        # sizes: integer MiB, or a string with a binary unit; a bare numeric string is MiB
        ({"memory": "1G"}, True),
        ({"memory": "1GiB"}, True),
        ({"memory": "512Mi"}, True),
        ({"memory": "1.5g"}, True),
        ({"memory": "2048"}, True),
        ({"memory": 2048}, True),
        ({"memory": "1GB"}, False),
        ({"memory": "1 parsec"}, False),
        ({"memory": 16}, False),
        ({"memory": 1.5}, False),
        ({"memory": -512}, False),
        ({"disk": 8}, False),
        ({"disk": 16777217}, False),
        # cpus
        ({"cpus": 0.25}, True),
        ({"cpus": 256}, True),
        ({"cpus": 0}, False),
        ({"cpus": 256.5}, False),
        ({"cpus": "2"}, False),
        # a value produced entirely by interpolation may stand for a number or a bool
        ({"cpus": "${CPUS:-1}"}, True),
        ({"privileged": "${PRIVILEGED:-false}"}, True),
        ({"memory": "${MEMORY:-1GiB}"}, True),
        ({"cpus": "${CPUS:-1} cores"}, False),
        ({"privileged": "true"}, False),
        # durations
        ({"healthcheck": {"test": "true", "interval": "1h30m"}}, True),
        ({"healthcheck": {"test": "true", "interval": "1.5s"}}, True),
        ({"healthcheck": {"test": "true", "interval": "250\u00b5s"}}, True),  # MICRO SIGN
        ({"healthcheck": {"test": "true", "interval": "250\u03bcs"}}, True),  # GREEK MU, as Go
        ({"healthcheck": {"test": "true", "interval": 30}}, True),
        ({"healthcheck": {"test": "true", "interval": "30"}}, False),
        ({"healthcheck": {"test": "true", "interval": "30 s"}}, False),
        ({"healthcheck": {"test": "true", "interval": -1}}, False),
        ({"healthcheck": {"test": [], "interval": "1s"}}, False),
        # env and labels
        ({"env": {"A": "x", "_B1": 2, "C": True}}, True),
        ({"env": ["A=x", "B=", "C=a=b"]}, True),
        ({"env": ["A"]}, False),
        ({"env": {"A": None}}, False),
        ({"env": {"A": ["x"]}}, False),
        ({"labels": {"com.example/team": "x"}}, True),
        ({"labels": ["=x"]}, False),
        # commands
        ({"command": "echo hi"}, True),
        ({"command": []}, False),
        ({"command": ""}, False),
        ({"command": ["echo", 1]}, False),
        ({"entrypoint": []}, True),
        ({"entrypoint": ""}, True),
        # names
        ({"depends_on": ["db", "db"]}, False),
        ({"depends_on": ["Db"]}, False),
        ({"hostname": "a-" + "b" * 61}, True),
        ({"hostname": "a" * 64}, False),
        ({"hostname": "web.internal"}, True),
        ({"user": "1000:1000"}, True),
        ({"user": "a:b:c"}, False),
        ({"restart": "no"}, True),
        ({"restart": False}, False),
        # network
        ({"network": {"allow_hosts": ["*", "*.example.com", "api-*.example.com", "::1"]}}, True),
        ({"network": {"allow_hosts": ["http://example.com"]}}, False),
        ({"network": {"allow_hosts": ["example.com:443"]}}, False),
        ({"network": {"allow_hosts": ["[::1]"]}}, False),
        ({"network": {"dns_servers": ["1.1.1.1", "2001:db8::1"]}}, True),
        ({"network": {"dns_servers": ["256.1.1.1"]}}, False),
        ({"network": {"add_hosts": {"db": "10.0.0.1"}}}, True),
        ({"network": {"add_hosts": {"bad host": "10.0.0.1"}}}, False),
        ({"network": {"mtu": 68}}, True),
        ({"network": {"mtu": 67}}, False),
        ({"network": {"no_network": True, "allow_hosts": [], "intercept": False}}, True),
        ({"network": {"no_network": False, "allow_hosts": ["a.com"], "intercept": True}}, True),
        ({"network": {"no_network": True}, "secrets": []}, True),
        # secrets
        ({"secrets": [{"name": "T", "from_env": "T", "hosts": ["*"]}]}, True),
        ({"secrets": [{"name": "T", "from_command": "pass t", "hosts": ["*"]}]}, True),
        ({"secrets": [{"name": "T", "from_command": [], "hosts": ["*"]}]}, False),
        ({"secrets": [{"name": "T", "value": "v", "hosts": ["*"]}]}, False),
        ({"secrets": [{"name": "T-1", "from_env": "T", "hosts": ["*"]}]}, False),
        # mounts
        ({"mounts": [{"target": "/m", "mode": "memory", "source": "."}]}, False),
        ({"mounts": [{"source": ".", "target": "/a/b..c"}]}, True),
        ({"mounts": [{"source": ".", "target": "/a/.."}]}, False),
        ({"mounts": [{"source": ".", "target": "/a b"}]}, False),
        ({"mounts": [{"target": "/m"}]}, False),
        ({"mounts": [{"source": "."}]}, False),
        # ports
        ({"ports": [{"guest": 80}]}, True),
        ({"ports": [{"host": 80, "guest": 80, "address": "localhost"}]}, True),
        ({"ports": [{"host": 80, "guest": 80, "address": "example.com"}]}, False),
        ({"ports": [{"host": 80, "guest": 80, "protocol": "udp"}]}, False),
        ({"ports": [{"host": 80}]}, False),
        ({"x-anything": {"goes": [1, 2]}}, True),
]


def rule_id(fields, valid):
    return f"{'ok' if valid else 'bad'}:{json.dumps(fields, ensure_ascii=True)}"


@pytest.mark.parametrize(
    "fields, valid", SANDBOX_RULES, ids=[rule_id(f, v) for f, v in SANDBOX_RULES]
)
def test_schema_rule(fields, valid, validator):
    errors = list(validator.iter_errors(_sandbox(**fields)))
    assert (not errors) == valid, [f"{dotted(e.absolute_path)}: {e.message}" for e in errors]


TOP_LEVEL_RULES = [
        ({"version": 1, "sandboxes": {"a": {"image": "x"}}}, True),
        ({"version": "1", "sandboxes": {"a": {"image": "x"}}}, True),
        ({"version": 2, "sandboxes": {"a": {"image": "x"}}}, False),
        ({"name": "a" * 63, "sandboxes": {"a": {"image": "x"}}}, True),
        ({"name": "a" * 64, "sandboxes": {"a": {"image": "x"}}}, False),
        ({"name": "_a", "sandboxes": {"a": {"image": "x"}}}, False),
        ({"sandboxes": {"a" * 64: {"image": "x"}}}, False),
        ({"sandboxes": {"my_box-2": {"image": "x"}}}, True),
        ({"sandboxes": {"a": {"image": ""}}}, False),
        ({"x-top": 1, "sandboxes": {"a": {"image": "x"}}}, True),
        ({"services": {}, "sandboxes": {"a": {"image": "x"}}}, False),
        ({"sandboxes": {}}, False),
        ({}, False),
]


@pytest.mark.parametrize(
    "document, valid", TOP_LEVEL_RULES, ids=[rule_id(d, v) for d, v in TOP_LEVEL_RULES]
)
def test_schema_top_level_rule(document, valid, validator):
    assert (not list(validator.iter_errors(document))) == valid
