import sys

from recipec.cli import main

sys.exit(main())
