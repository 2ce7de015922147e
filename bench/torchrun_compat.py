"""`torchrun` (torch.distributed.run) with one fix for Debian's PyTorch 1.13 under Python 3.11.

torch 1.13's `Std.from_str` finds a redirect setting by iterating the `Std` flag enum, and since
Python 3.11 iterating a flag enum skips its zero member, so the default `--redirects 0` (no
redirection) comes back as None and the launcher fails in `to_map` before starting a worker.
This maps the digits to `Std` directly; everything else is torchrun as shipped.
"""

import re
import sys

from torch.distributed.elastic.multiprocessing import api


def _from_str(cls, vm):
    if re.fullmatch(r"\d", vm):
        return cls(int(vm))
    return {int(i): cls(int(v)) for i, v in (m.split(":") for m in vm.split(","))}


api.Std.from_str = classmethod(_from_str)

if __name__ == "__main__":
    from torch.distributed.run import main

    sys.exit(main())
