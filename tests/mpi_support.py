"""`charnn` as one rank of an MPI job, for test_mpi.py (run by mpiexec as a script).

    CHARNN_TEST_PIDS=DIR       write this process's pid to DIR/rank-R (R its rank), so a test
                               can kill one rank
    CHARNN_TEST_FAIL=R:STEP    rank R raises RuntimeError("injected fault") in its training
                               step STEP (counted from 1 over the whole run)

Everything else is the real command: the arguments are charnn's.
"""

from __future__ import annotations

import os
import sys


def main():
    rank = os.environ.get("PMI_RANK", "0")
    pids = os.environ.get("CHARNN_TEST_PIDS")
    if pids:
        with open(os.path.join(pids, f"rank-{rank}"), "w") as f:
            f.write(str(os.getpid()))
    fail = os.environ.get("CHARNN_TEST_FAIL")
    if fail and fail.split(":")[0] == rank:
        from charnn import train

        at = int(fail.split(":")[1])
        step = train.Trainer._step

        def failing(self, x, y, started):
            if self.counters["step"] + 1 == at:
                raise RuntimeError("injected fault")
            return step(self, x, y, started)

        train.Trainer._step = failing
    from charnn.__main__ import main as charnn_main

    sys.argv = ["charnn"] + sys.argv[1:]
    charnn_main()


if __name__ == "__main__":
    main()
