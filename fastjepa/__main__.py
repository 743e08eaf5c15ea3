import sys

from fastjepa.cli import main

sys.exit(main())
