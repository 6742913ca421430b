# SPDX-License-Identifier: Apache-2.0
"""Black-box tests of `matchlock validate`, `config`, `version` and `completion`."""
import json
import pathlib
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "sandboxes"
EX_USAGE, EX_DATAERR, EX_NOINPUT = 64, 65, 66


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_version_and_help(matchlock):
    r = matchlock.run("version")
    assert r.code == 0 and r.out.startswith("matchlock ")
    assert matchlock.run("--version").code == 0
    for cmd in ([], ["validate"], ["config"], ["version"], ["completion"]):
        r = matchlock.run(*cmd, "--help")
        assert r.code == 0, r.err
        assert "Usage" in r.out


def test_usage_errors_exit_64(matchlock):
    assert matchlock.run().code == EX_USAGE
    assert matchlock.run("no-such-command").code == EX_USAGE
    assert matchlock.run("validate").code == EX_USAGE  # -f is required
    assert matchlock.run("config", "-f", "x.toml", "--output", "xml").code == EX_USAGE


def test_validate_examples(matchlock):
    r = matchlock.run("validate", "-f", EXAMPLES)
    assert r.code == 0, r.err
    for f in EXAMPLES.glob("*.*"):
        if f.suffix in (".toml", ".yaml", ".yml", ".json"):
            assert f"ok  {f}" in r.out


@pytest.mark.parametrize("name,text,where", [
    ("bad.toml", 'name = "p"\n[sandboxes.coder]\nimage = "busybox"\ncpus = "two"\n',
     "bad.toml:4:8: sandboxes.coder.cpus: expected a number, got string"),
    ("bad.yaml", "name: p\nsandboxes:\n  coder:\n    image: busybox\n    cpus: two\n",
     "bad.yaml:5:11: sandboxes.coder.cpus: expected a number, got string"),
    ("bad.json", '{"sandboxes": {"coder": {"image": "busybox",\n  "cpus": "two"}}}',
     "bad.json:2:11: sandboxes.coder.cpus: expected a number, got string"),
])
def test_validate_type_error_names_file_line_col(matchlock, tmp_path, name, text, where):
    spec = write(tmp_path / name, text)
    r = matchlock.run("validate", "-f", spec)
    assert r.code == EX_DATAERR
    assert f"{spec.parent}/{where}" in r.err
    assert r.out == ""


@pytest.mark.parametrize("name,data,expect", [
    ("key.yaml", b"T\xa8: 1\n", "key.yaml:1:1: <root>: a key is not valid UTF-8"),
    ("value.yaml", b"sandboxes:\n  a:\n    image: \"x\xff\"\n",
     "value.yaml:3:12: sandboxes.a.image: the value is not valid UTF-8"),
    ("loop.yaml", b",[", "loop.yaml:1:"),
    ("number.json", b'{"sandboxes": 8e+88888}', "number.json: <root>: JSON error: number overflow"),
])
def test_validate_survives_what_the_fuzzer_found(matchlock, tmp_path, name, data, expect):
    # Each of these once ended `validate` with an uncaught exception, or (",[") never returned.
    spec = tmp_path / name
    spec.write_bytes(data)
    r = matchlock.run("validate", "-f", spec, timeout=20)
    assert r.code == EX_DATAERR, r.err
    assert f"{spec.parent}/{expect}" in r.err, r.err


def test_validate_reports_every_error_with_hints(matchlock, tmp_path):
    spec = write(tmp_path / "s.yaml", "sandboxes:\n  a:\n    imgae: busybox\n    memroy: 1GiB\n")
    r = matchlock.run("validate", "-f", spec)
    assert r.code == EX_DATAERR
    assert "unknown key 'imgae' (did you mean 'image'?)" in r.err
    assert "unknown key 'memroy' (did you mean 'memory'?)" in r.err
    assert "missing required key 'image'" in r.err
    assert "3 errors in spec" in r.err


def test_validate_json_output(matchlock, tmp_path):
    good = matchlock.run("validate", "-f", EXAMPLES / "agent.toml", "-o", "json")
    assert good.code == 0
    doc = json.loads(good.out)
    assert doc["valid"] is True and doc["errors"] == []
    bad = write(tmp_path / "b.toml", "[sandboxes.a]\n")
    r = matchlock.run("validate", "-f", bad, "-o", "json")
    assert r.code == EX_DATAERR
    doc = json.loads(r.out)
    assert doc["valid"] is False
    assert any("missing required key 'image'" in e for e in doc["errors"])


def test_missing_file_exit_66(matchlock, tmp_path):
    r = matchlock.run("validate", "-f", tmp_path / "nope.toml")
    assert r.code == EX_NOINPUT
    assert "nope.toml" in r.err


def test_config_json_and_yaml_agree_and_are_fixed_points(matchlock, tmp_path):
    src = EXAMPLES / "agent.toml"
    j = matchlock.run("config", "-f", src, "-o", "json")
    y = matchlock.run("config", "-f", src)
    assert j.code == 0 and y.code == 0, j.err + y.err
    as_json = json.loads(j.out)
    assert yaml.safe_load(y.out) == as_json
    assert as_json["version"] == 1
    # The normalized output is itself a valid spec that normalizes to the same thing.
    again = write(tmp_path / "normal.json", j.out)
    j2 = matchlock.run("config", "-f", again, "-o", "json")
    assert j2.code == 0, j2.err
    assert json.loads(j2.out) == as_json


def test_config_never_prints_secret_values(matchlock):
    value = "sk-ant-THIS-MUST-NOT-LEAK-1234"
    r = matchlock.run("config", "-f", EXAMPLES / "agent.toml", "-o", "json",
                      env={"ANTHROPIC_API_KEY": value})
    assert r.code == 0, r.err
    assert value not in r.out and value not in r.err
    doc = json.loads(r.out)
    secrets = [s for sb in doc["sandboxes"].values() for s in sb["secrets"]]
    assert secrets and all("from_env" in s or "from_file" in s or "from_command" in s
                           for s in secrets)


def test_interpolation_env_wins_over_dotenv(matchlock, tmp_path):
    spec = write(tmp_path / "proj" / "s.yaml",
                 "sandboxes:\n  a:\n    image: ${IMAGE}\n    memory: ${MEM:-256}\n"
                 "    env: {GREETING: \"hello ${WHO:-world}\"}\n")
    write(tmp_path / "proj" / ".env", "IMAGE=from-dotenv\nWHO=dotenv\n")
    r = matchlock.run("config", "-f", spec, "-o", "json", unset=("IMAGE", "WHO", "MEM"))
    assert r.code == 0, r.err
    a = json.loads(r.out)["sandboxes"]["a"]
    assert a["image"] == "from-dotenv"
    assert a["memory"] == 256
    assert a["env"]["GREETING"] == "hello dotenv"
    r = matchlock.run("config", "-f", spec, "-o", "json", env={"IMAGE": "from-env", "MEM": "1024"})
    a = json.loads(r.out)["sandboxes"]["a"]
    assert a["image"] == "from-env" and a["memory"] == 1024


def test_required_variable_error(matchlock, tmp_path):
    spec = write(tmp_path / "s.toml", '[sandboxes.a]\nimage = "${IMG:?set IMG to the image}"\n')
    r = matchlock.run("validate", "-f", spec, unset=("IMG",))
    assert r.code == EX_DATAERR
    assert "s.toml:2:9: sandboxes.a.image: required variable IMG is missing a value: set IMG to " \
           "the image" in r.err


def test_project_name_precedence(matchlock, tmp_path):
    spec = write(tmp_path / "My Dir" / "s.toml", '[sandboxes.a]\nimage = "busybox"\n')
    name = lambda r: json.loads(r.out)["name"]  # noqa: E731
    assert name(matchlock.run("config", "-f", spec, "-o", "json")) == "mydir"
    write(spec, 'name = "fromfile"\n[sandboxes.a]\nimage = "busybox"\n')
    assert name(matchlock.run("config", "-f", spec, "-o", "json")) == "fromfile"
    assert name(matchlock.run("config", "-f", spec, "-o", "json",
                              env={"MATCHLOCK_PROJECT": "fromenv"})) == "fromenv"
    assert name(matchlock.run("config", "-f", spec, "-o", "json", "-p", "flag",
                              env={"MATCHLOCK_PROJECT": "fromenv"})) == "flag"
    bad = matchlock.run("config", "-f", spec, "-p", "Bad Name")
    assert bad.code == EX_DATAERR and "invalid project name" in bad.err


def test_directory_of_several_projects_and_duplicates(matchlock, tmp_path):
    write(tmp_path / "d" / "a.toml", 'name = "one"\n[sandboxes.web]\nimage = "busybox"\n')
    write(tmp_path / "d" / "b.yaml", "name: two\nsandboxes:\n  web:\n    image: busybox\n")
    r = matchlock.run("config", "-f", tmp_path / "d", "-o", "json")
    assert r.code == 0, r.err
    assert [p["name"] for p in json.loads(r.out)] == ["one", "two"]
    # Same project in two files declaring the same sandbox: an error naming both places.
    write(tmp_path / "d" / "b.yaml", "name: one\nsandboxes:\n  web:\n    image: busybox\n")
    r = matchlock.run("validate", "-f", tmp_path / "d")
    assert r.code == EX_DATAERR
    assert "b.yaml:3:3: sandboxes.web: sandbox 'web' of project 'one' is already declared at" in r.err
    assert "a.toml:2:12" in r.err


def test_depends_on_across_files_of_one_project(matchlock, tmp_path):
    write(tmp_path / "p" / "a.toml", 'name = "p"\n[sandboxes.api]\nimage = "busybox"\n'
          'depends_on = ["db"]\n')
    write(tmp_path / "p" / "b.toml", 'name = "p"\n[sandboxes.db]\nimage = "busybox"\n')
    assert matchlock.run("validate", "-f", tmp_path / "p").code == 0
    r = matchlock.run("validate", "-f", tmp_path / "p" / "a.toml")
    assert r.code == EX_DATAERR
    assert "depends on unknown sandbox 'db'" in r.err


def test_completion_scripts_parse(matchlock, tmp_path):
    for shell in ("bash", "zsh"):
        r = matchlock.run("completion", shell)
        assert r.code == 0
        assert "validate" in r.out and "--file" in r.out
    script = write(tmp_path / "c.bash", matchlock.run("completion", "bash").out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
