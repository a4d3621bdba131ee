"""``python -m disco``: the ``disco-cli`` command, for an environment whose scripts folder is not
on the PATH (a ``ray job submit`` entrypoint runs with the PATH its head's ``ray start`` had)."""

import sys

from disco.cli import main

sys.exit(main())
