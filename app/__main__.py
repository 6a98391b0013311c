"""`python -m app` and the built file both start here."""

from app.cli import main

raise SystemExit(main())
