"""`python -m strop ...` is `strop ...` (handy under torchrun: `torchrun ... -m strop train CONFIG`)."""

import sys

from strop.cli import main

sys.exit(main())
