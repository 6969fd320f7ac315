import sys

from checkpointing.cli import main

sys.exit(main())
