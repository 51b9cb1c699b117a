"""How a command that writes into a checkpoint records itself, so what it wrote can be remade.

`deqguard train` puts this record in metadata["training"] and `deqguard detect fit --write` in the
detector block. The command is one shell-quoted line (paste it back into a shell to rerun), next to
the argument list it was parsed from, and the deqguard version that ran it: the checkpoint's own
`deqguard_version` names only the version that wrote the tensors, and a block added later may come
from another release.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from deqguard import __version__


def invocation(argv: Sequence[str]) -> dict[str, Any]:
    """{"command", "argv", "deqguard_version"} for a command run as `argv` (program name first).

    Callers pass the arguments their parser was given, never `sys.argv` behind their back: a
    command started from Python (a test, another tool) then records what it really ran.
    """
    args = [str(a) for a in argv]
    return {"command": shlex.join(args), "argv": args, "deqguard_version": __version__}
