"""``python -m ledger.cli``: the ``celery-ledger`` command without its script."""

import sys

from ledger.cli import main

sys.exit(main())
