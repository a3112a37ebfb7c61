import sys

from engine.daemon.engine import main

sys.exit(main())
