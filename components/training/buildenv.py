"""The build environment for DeepSpeed's JIT-compiled ops (imported before DeepSpeed is)."""

from __future__ import annotations

import os
import sys


def prefer_interpreter_build_tools() -> None:
    """Put this interpreter's bin dir first on PATH, so torch's JIT builds use the `ninja` pinned in
    the environment. Why: a system ninja (Debian's 1.11) and the pinned one (1.13) hash build
    commands differently (MurmurHash vs rapidhash), so processes that find different ninjas on PATH
    each see the other's build log as stale and rebuild the op, holding the extension lock ~1 min."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
