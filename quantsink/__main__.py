"""`python -m quantsink ...`, which torchrun launches as `torchrun --nproc-per-node N -m quantsink ...`."""
import sys

from quantsink.cli import main

if __name__ == "__main__":
    sys.exit(main())
