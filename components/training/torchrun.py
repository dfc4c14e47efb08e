"""`torchrun` as a PyTorchJob container's main process, exiting with the code Kubernetes' restart
policies read (the PyTorchJob default `restartPolicy: ExitCode` restarts a pod on 128+, a killed or
preempted one, and fails the job on 1-127, a Python error):

    python -m kubellm.training.torchrun --nproc-per-node 4 -m kubellm.training.worker --spec ...

Plain torchrun turns the SIGTERM of an eviction or preemption into an exception and exits 1, and a
worker killed by a signal (the kernel's OOM killer) into a ChildFailedError and exits 1: both read as
a permanent failure, so one preempted node failed the whole job. Here they exit 128 + the signal.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:  # this process was signalled (eviction, preemption)
        print(f"kubellm torchrun: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if codes and all(c < 0 for c in codes):  # every failed worker was killed by a signal
            return 128 - codes[0]
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
