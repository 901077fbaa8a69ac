import sys

from optkit.cli import main

sys.exit(main())
