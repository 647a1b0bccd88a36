import sys

from userstream.cli import main

sys.exit(main())
