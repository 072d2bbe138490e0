"""``python -m naics_hnm.mine`` and the ``naics-hnm-mine`` script: see :mod:`naics_hnm.st.cli`."""

from __future__ import annotations

import sys

from naics_hnm.st.cli import build_parser, main  # noqa: F401  (the entry point's names)

if __name__ == "__main__":
    sys.exit(main())
