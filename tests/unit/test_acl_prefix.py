"""Kafka ACLs by prefix: one project's prefix covers every topic and consumer group of its own and
none of another project's, even when one project name starts with the other (finding 8)."""

from __future__ import annotations

import re

import pytest

from dashboard.live import LiveHub
from streams.stages import stage_kind
from tensordb.config import PROCESSOR_TOPICS, Settings
from tests import REPO

#: Pairs where the first name is a prefix of the second (with each character names may continue with).
PAIRS = [("radiology", "radiology-research"), ("lab", "lab_2"), ("x1", "x12")]


def _names(settings: Settings) -> set[str]:
    """Every topic and consumer group name a project's processes use."""
    groups = {settings.processor_group(kind) for kind in PROCESSOR_TOPICS}
    groups |= {settings.processor_group(stage_kind("resize")), settings.processor_group("predictor-digits-v2")}
    groups |= {settings.consumer_group(name) for name in ("workers", "serve-0a1b2c3d")}
    groups.add(LiveHub(settings).group)
    return groups | set(settings.all_topics().values())


@pytest.mark.parametrize(("short", "long"), PAIRS)
def test_one_projects_acl_prefix_covers_all_of_its_names_and_none_of_the_others(short: str, long: str) -> None:
    first, second = Settings(project=short), Settings(project=long)
    for own, other in ((first, second), (second, first)):
        assert all(name.startswith(own.acl_prefix()) for name in _names(own))
        covered = [name for name in _names(other) if name.startswith(own.acl_prefix())]
        assert covered == [], f"{own.project}'s ACL prefix {own.acl_prefix()!r} covers {other.project}'s {covered}"


#: Settings, and the upgrade that reads the groups of earlier versions by their old names.
NAMED_HERE = {"tensordb/config.py", "tensordb/infra/legacy_groups.py"}


def test_no_code_names_a_group_or_topic_by_hand() -> None:
    """Names built from ``topic_prefix`` outside Settings would escape the ACL prefix's guarantee."""
    by_hand = re.compile(r"\{[\w.]*topic_prefix\}")  # an f-string field
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("tensordb", "streams", "workers", "dashboard", "bench")
        for path in (REPO / folder).rglob("*.py")
        if path.relative_to(REPO).as_posix() not in NAMED_HERE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert offenders == []
