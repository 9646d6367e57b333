import sys

from sslcell.cli import main

sys.exit(main())
