"""Committed offsets carried from the consumer groups of earlier versions to their names now.

Groups were named ``PREFIX-PROJECT-NAME``; a project name may contain ``-``, so one project's ACL
prefix covered another's groups. They are now ``PREFIX.PROJECT.NAME`` (:meth:`Settings.consumer_group`).
A renamed group starts with nothing committed and would read its topics from the earliest record
again (redone ingest, re-answered predict requests), so ``tensordb project carry-offsets NAME``
copies each old group's offsets, once, while no process of the project runs.
"""

from __future__ import annotations

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tensordb.config import Settings
from tensordb.errors import ConfigurationError

_TIMEOUT = 15.0


def legacy_group_prefix(settings: Settings) -> str:
    """``PREFIX-PROJECT-``: the start of the project's consumer groups before the rename."""
    return f"{settings.topic_prefix}-{settings.project}-"


def carry_offsets(settings: Settings) -> dict[str, int]:
    """Commit each old group's offsets into its new name, for the partitions where the new group has
    committed nothing yet; returns the partitions carried per new group name (0: already there).

    Only offsets on the project's own topics are carried: a group such as ``tensordb-radiology-research-ingest``
    starts like one of project ``radiology``'s, but its offsets are on ``tensordb.radiology-research.*``.

    Parameters
    ----------
    settings:
        The project (and the broker); run it while none of the project's consumers runs, since a
        broker changes the offsets of a group only while the group has no members.
    """
    admin = AdminClient(settings.kafka_config())
    old_prefix = legacy_group_prefix(settings)
    try:
        groups = sorted(
            group.group_id
            for group in admin.list_consumer_groups(request_timeout=_TIMEOUT).result().valid
            if group.group_id.startswith(old_prefix)
        )
        carried = {}
        for old in groups:
            offsets = _committed(admin, ConsumerGroupTopicPartitions(old))
            own = [tp for tp in offsets if tp.offset >= 0 and tp.topic.startswith(settings.acl_prefix())]
            if not own:
                continue  # another project's group (or nothing committed): not this project's to carry
            new = settings.consumer_group(old.removeprefix(old_prefix))
            present = _committed(admin, ConsumerGroupTopicPartitions(new, [TopicPartition(tp.topic, tp.partition) for tp in own]))
            done = {(tp.topic, tp.partition) for tp in present if tp.offset >= 0}
            wanted = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in own if (tp.topic, tp.partition) not in done]
            if wanted:
                admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(new, wanted)])[new].result()
            carried[new] = len(wanted)
    except KafkaException as exc:
        raise ConfigurationError(
            f"could not carry the committed offsets of {old_prefix}* ({exc.args[0].str()}): stop every process of project "
            f"{settings.project!r} (a group's offsets change only while it has no members) and check the principal may "
            "describe and read those groups"
        ) from exc
    return carried


def _committed(admin: AdminClient, request: ConsumerGroupTopicPartitions) -> list[TopicPartition]:
    answer = admin.list_consumer_group_offsets([request], request_timeout=_TIMEOUT)[request.group_id].result()
    return list(answer.topic_partitions or [])
