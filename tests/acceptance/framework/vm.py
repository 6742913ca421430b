# SPDX-License-Identifier: Apache-2.0
"""Real micro-VMs through the matchlock CLI: an isolated MATCHLOCK_HOME and cache per test, the
busybox fixture image, and process-table probes for leak checks (stdlib only)."""
import json
import os
import pathlib
import sqlite3
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]


def busybox_save_tar():
    out = subprocess.run([sys.executable, str(ROOT / "tests/fixtures/build_images.py"), "busybox"],
                         check=True, capture_output=True, text=True, timeout=600)
    return pathlib.Path(out.stdout.strip().splitlines()[-1]) / "busybox-save.tar"


class VmEnv:
    def __init__(self, tmp_path, kernel):
        self.binary = os.environ.get("MATCHLOCK_BIN", str(ROOT / "build" / "matchlock"))
        self.home = tmp_path / "home"
        self.env = dict(os.environ)
        self.env.update({"MATCHLOCK_HOME": str(self.home), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                         "MATCHLOCK_KERNEL": kernel, "MATCHLOCK_ACCEL": "tcg"})
        self.env.pop("MATCHLOCK_PROJECT", None)
        self.env.pop("MATCHLOCK_FAULT", None)

    def import_image(self, tar, name="busybox:latest"):
        with open(tar, "rb") as f:
            r = subprocess.run([self.binary, "image", "import", name], stdin=f,
                               capture_output=True, text=True, env=self.env, timeout=300)
        assert r.returncode == 0, r.stderr

    def import_layout(self, layout, name):
        """Imports an OCI image layout directory (a test fixture) as `name`."""
        tar = subprocess.run(["tar", "-C", str(layout), "-cf", "-", "."], check=True,
                             capture_output=True).stdout
        r = subprocess.run([self.binary, "image", "import", name], input=tar,
                           capture_output=True, env=self.env, timeout=300)
        assert r.returncode == 0, r.stderr

    def run(self, *args, timeout=120, input=None, check=False, env=None):
        full = dict(self.env)
        full.update(env or {})
        p = subprocess.run([self.binary, *map(str, args)], capture_output=True, text=True,
                           env=full, timeout=timeout, input=input)
        if check:
            assert p.returncode == 0, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def popen(self, *args, **kw):
        return subprocess.Popen([self.binary, *map(str, args)], env=self.env, **kw)

    def sandboxes(self):
        return json.loads(self.run("list", "-o", "json", check=True).stdout)

    def run_dirs(self):
        d = self.home / "run"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def db_counts(self):
        """Rows per state table that must be empty once everything is down."""
        db = self.home / "state.db"
        if not db.exists():
            return {}
        con = sqlite3.connect(db)
        try:
            return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("projects", "sandboxes", "vms", "owned_resources", "subnets")}
        finally:
            con.close()


def pids_matching(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return out.stdout.split()


def qemu_pids(fragment):
    """VMM processes whose command line (it names the sandbox: `-name <id>`) or environment (a
    jailed VMM sees no host path, but keeps the supervisor's MATCHLOCK_HOME) holds `fragment`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            if "qemu-system" not in cmdline.split(" ", 1)[0]:
                continue
            if fragment in cmdline:
                found.append(entry)
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if fragment.encode() in f.read():
                    found.append(entry)
        except OSError:
            continue  # gone meanwhile
    return found


def supervisor_pids(sandbox_dir_fragment):
    return pids_matching(f"__supervise.*{sandbox_dir_fragment}")
