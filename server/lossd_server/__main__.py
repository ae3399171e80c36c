import sys

from lossd_server.cli import main

sys.exit(main())
