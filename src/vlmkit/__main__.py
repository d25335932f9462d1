"""`python -m vlmkit ...`: the command line, also as torchrun starts it (`torchrun ... -m vlmkit train clip`)."""
import sys

from vlmkit.cli import main

sys.exit(main())
