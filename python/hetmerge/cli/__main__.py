"""`python -m hetmerge.cli`."""
from .main import main

raise SystemExit(main())
