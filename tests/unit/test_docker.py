"""The Docker image holds every package the ``tensordb`` command imports, and the built dashboard.

No Docker engine is needed: the Dockerfile's ``COPY`` lines are compared with the import graph of
the CLI (what ``tensordb processors``, ``worker``, ``serve``, ``dashboard`` and ``demo`` load)."""

from __future__ import annotations

import re

import grimp

from tests import REPO

FIRST_PARTY = ("tensordb", "streams", "workers", "dashboard")


def _copied_folders(dockerfile: str) -> set[str]:
    """Top-level folders the final stage copies from the build context."""
    final_stage = dockerfile.split("\nFROM ")[-1]
    return {match.group(1) for match in re.finditer(r"^COPY (?!--from)(\w+)/ \1/$", final_stage, re.M)}


def test_the_image_copies_every_package_the_cli_imports_and_the_built_front_end() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    graph = grimp.build_graph(*FIRST_PARTY)
    needed = {"tensordb"} | {
        module.split(".")[0] for module in graph.find_upstream_modules("tensordb.cli") if module.split(".")[0] in FIRST_PARTY
    }
    assert needed == set(FIRST_PARTY), "the CLI should reach every application"
    copied = _copied_folders(dockerfile)
    assert needed | {"schemas"} <= copied, f"the Dockerfile does not copy {sorted(needed | {'schemas'} - copied)}"
    assert "COPY --from=dashboard /src/dashboard/static/ dashboard/static/" in dockerfile, "the built front end is missing"
    assert "npm run --silent build" in dockerfile.split("\nFROM ")[1], "the first stage should build the front end"
