import sys

from annomine.cli import main

sys.exit(main())
