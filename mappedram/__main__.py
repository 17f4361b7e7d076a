"""`python3 -m mappedram`: the same command line as `mappedram`."""

from .cli import main

raise SystemExit(main())
