"""``torchrun --nproc_per_node N -m engine.train <flags>`` (or ``python -m engine.train`` for one rank):
the training worker, whose code lives in ``engine/worker/``."""

import sys

from engine.worker.trainer import build_parser, main  # noqa: F401 (the worker's command line)

if __name__ == "__main__":
    sys.exit(main())
