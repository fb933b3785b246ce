import sys

from rigface.cli import main

sys.exit(main())
