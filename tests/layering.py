#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Checks #include lines against the module table of docs/architecture.md (STYLE.md 7.2).

A module may include its own headers, the headers of the modules it may depend on, and third-party
or system headers. CMake cannot enforce this because every module shares src/ as include root.
"""
import pathlib
import re
import sys

# module -> modules it may include (besides itself)
ALLOWED = {
    "common": set(),
    "sys": {"common"},
    "ev": {"common", "sys"},
    "guestproto": {"common"},
    "spec": {"common"},
    "state": {"common", "spec", "sys"},
    "image": {"common", "sys", "state"},
    "vm": {"common", "sys", "ev", "guestproto"},
    "net": {"common", "sys", "ev", "spec"},
    "vfs": {"common", "sys", "ev", "guestproto"},
    "ports": {"common", "sys", "ev", "guestproto"},
    "health": {"common", "ev", "guestproto"},
    "reconcile": {"common", "ev", "spec", "state", "vm", "net", "vfs", "image"},
    "supervisor": {"common", "sys", "ev", "guestproto", "spec", "state", "vm", "image", "net", "vfs",
                   "ports", "health"},
    "runtime": {"common", "sys", "ev", "guestproto", "spec", "state", "image", "vm", "net", "vfs",
                "ports", "health", "supervisor", "reconcile"},
    "rpc": {"common", "sys", "ev", "guestproto", "spec", "state", "image", "vm", "net", "vfs",
            "supervisor", "runtime"},
    "cli": {"common", "spec", "state", "rpc", "reconcile", "image", "vm", "net", "vfs", "sys", "ev",
            "supervisor", "guestproto", "runtime"},
    "app": None,  # composition root: anything
}
# reconcile may use only interface headers (module root), never implementation subfolders.
INTERFACE_ONLY = {"reconcile": {"vm", "net", "vfs", "image"}}
GUEST_ALLOWED = {"common", "sys", "ev", "guestproto"}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def check(root: pathlib.Path) -> list[str]:
    problems = []
    src = root / "src"
    files = [p for p in src.rglob("*") if p.suffix in (".h", ".cc")]
    files += [p for p in (root / "guest").rglob("*") if p.suffix in (".h", ".cc")]
    for path in sorted(files):
        rel = path.relative_to(root)
        if rel.parts[0] == "guest":
            module, allowed = "guest", GUEST_ALLOWED
        else:
            module = rel.parts[1]
            if module not in ALLOWED:
                problems.append(f"{rel}: module '{module}' is not in the layering table")
                continue
            allowed = ALLOWED[module]
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = INCLUDE.match(line)
            if not m:
                continue
            target = m.group(1)
            parts = target.split("/")
            if len(parts) < 2:
                continue  # generated headers (ml_version.h, *_embedded.h)
            dep = parts[0]
            if dep == module or allowed is None:
                continue
            if dep not in allowed:
                problems.append(f"{rel}:{lineno}: '{module}' may not include \"{target}\"")
                continue
            if dep in INTERFACE_ONLY.get(module, set()) and len(parts) > 2:
                problems.append(
                    f"{rel}:{lineno}: '{module}' may include only interface headers of '{dep}'")
    return problems


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    problems = check(root)
    for p in problems:
        print(p)
    print(f"layering: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
