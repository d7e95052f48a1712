"""Start ``tensordb dashboard`` in the background next to the local services and print its address.

``tensordb services status`` lists it and ``tensordb services down`` stops it, like the other
background apps (``tensordb.services.apps``). ``make demo`` runs this after the demo, for the
demo's project::

    TENSORDB_PROJECT=demo TENSORDB_MONGO_DATABASE=tensordb_demo python -m dashboard.background
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tensordb.config import Settings, load_settings
from tensordb.errors import TensorDBError


def start_dashboard(settings: Settings, port: int | None = None) -> str:
    """Start the dashboard of ``settings.project`` (no-op if it runs already); returns its address."""
    from tensordb.services import LocalServices
    from tensordb.services.apps import running_apps
    from tensordb.services.process import free_port, port_is_free

    services = LocalServices(settings)
    host = settings.services_host
    for app in running_apps(services.run_dir, settings):
        if app.name == "dashboard" and app.process.pid() is not None:
            app.stop()  # it may belong to another project: start afresh
    if port is None:
        port = settings.dashboard_port if port_is_free(host, settings.dashboard_port) else free_port(host)
    services.start_app("dashboard", ["dashboard", "--host", host, "--port", str(port)])
    return f"http://{host}:{port}/"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start the dashboard in the background and print its address.")
    parser.add_argument(
        "--port", type=int, default=None, help="default TENSORDB_DASHBOARD_PORT (8050), or a free port if it is taken"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    try:
        address = start_dashboard(settings, args.port)
    except TensorDBError as exc:
        print(f"tensordb: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"Dashboard of project {settings.project!r}: {address}  (runs, live curves, models, data; "
        "stopped by `.venv/bin/tensordb services down`)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
