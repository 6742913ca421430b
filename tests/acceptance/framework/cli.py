# SPDX-License-Identifier: Apache-2.0
"""Runs the matchlock binary with an isolated MATCHLOCK_HOME (stdlib only)."""
import dataclasses
import os
import subprocess


@dataclasses.dataclass
class Completed:
    code: int
    out: str
    err: str


class Matchlock:
    def __init__(self, binary: str, home):
        self.binary = binary
        self.home = home

    def env(self, extra=None, unset=()):
        env = dict(os.environ)
        env["MATCHLOCK_HOME"] = str(self.home)
        env.pop("MATCHLOCK_PROJECT", None)
        for name in unset:
            env.pop(name, None)
        env.update(extra or {})
        return env

    def run(self, *args, env=None, unset=(), cwd=None, timeout=60, input=None) -> Completed:
        p = subprocess.run([self.binary, *map(str, args)], capture_output=True, text=True,
                           env=self.env(env, unset), cwd=cwd, timeout=timeout, input=input)
        return Completed(p.returncode, p.stdout, p.stderr)
