"""``python -m bootmae_ds.config``: the same as ``bootmae-config``."""

from .cli import main

raise SystemExit(main())
