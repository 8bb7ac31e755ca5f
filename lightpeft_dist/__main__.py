"""`python -m lightpeft_dist <stage>` (what `deepspeed --module lightpeft_dist` and `torchrun -m` run)."""

import sys

from .cli import main

sys.exit(main())
