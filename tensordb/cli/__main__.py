"""``python -m tensordb.cli``: how TensorDB starts its own background processes."""

from tensordb.cli import main

raise SystemExit(main())
