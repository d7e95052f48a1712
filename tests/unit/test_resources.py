"""Resources without servers: what jobs may ask for, what workers may offer, GPU detection, and
the worker command's options."""

from __future__ import annotations

import subprocess
from unittest.mock import MagicMock

import pytest

from tensordb import records
from tensordb.cli import build_parser
from tensordb.errors import ConfigurationError, JobError, ValidationError
from tensordb.jobs.queue import Jobs, resources_of
from tensordb.jobs.workers import capacity, detect_gpus


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"slots": 0}, "slots must be between 1 and 64, got 0"),
        ({"slots": -1}, "slots must be between 1 and 64"),
        ({"slots": 65}, "slots must be between 1 and 64, got 65"),
        ({"slots": 1.5}, "slots must be a whole number, got 1.5"),
        ({"slots": True}, "slots must be a whole number"),
        ({"slots": "2"}, "slots must be a whole number, got '2'"),
        ({"gpus": -1}, "gpus must be between 0 and 16, got -1"),
        ({"gpus": 17}, "gpus must be between 0 and 16"),
        ({"gpus": None}, "gpus must be a whole number"),
    ],
)
def test_a_job_asking_for_impossible_resources_is_refused_before_anything_is_stored(resources, message) -> None:
    store, publisher = MagicMock(), MagicMock()
    with pytest.raises(JobError, match=message):
        Jobs(store, publisher).submit("train", model={"entry_point": "tensordb.models.examples:digits_mlp"}, **resources)
    store.__getitem__.return_value.insert_one.assert_not_called()
    publisher.publish.assert_not_called()


def test_the_job_request_schema_bounds_resources_as_submit_does() -> None:
    request = {"schema": "job-request/1", "job_id": "job-1", "kind": "train", "submitted_at": "2024-01-01T00:00:00+00:00"}
    records.validate({**request, "resources": {"slots": 64, "gpus": 16}}, records.Schema.JOB_REQUEST)
    records.validate(request, records.Schema.JOB_REQUEST)  # optional: absent means 1 slot, no GPU
    for wrong in ({"slots": 0}, {"slots": 65}, {"gpus": -1}, {"gpus": 17}, {"slots": 1, "memory": 4}):
        with pytest.raises(ValidationError):
            records.validate({**request, "resources": wrong}, records.Schema.JOB_REQUEST)


def test_jobs_stored_without_resources_occupy_one_slot_and_no_gpu() -> None:
    assert resources_of({}) == {"slots": 1, "gpus": 0}
    assert resources_of({"resources": {"slots": 3, "gpus": 2}}) == {"slots": 3, "gpus": 2}


def test_a_worker_offers_at_least_one_slot_and_no_negative_gpus() -> None:
    assert capacity(4, 2) == (4, 2)
    assert capacity(1, 0) == (1, 0)
    for slots, gpus, message in ((0, 0, "slots must be a whole number of at least 1, got 0"),
                                 (2.5, 0, "slots must be a whole number of at least 1, got 2.5"),
                                 (True, 0, "slots must be"), (1, -1, "gpus must be a whole number of at least 0, got -1"),
                                 (1, "1", "gpus must be")):  # fmt: skip
        with pytest.raises(ConfigurationError, match=message):
            capacity(slots, gpus)


@pytest.mark.parametrize(
    ("visible", "count"),
    [("0,1", 2), ("3", 1), ("GPU-8f3c,GPU-1a2b", 2), ("", 0), ("-1", 0), ("0,-1,1", 1), (" 0 , 1 ", 2)],
)
def test_cuda_visible_devices_decides_how_many_gpus_are_detected(visible, count) -> None:
    def no_nvidia_smi(name: str) -> str:
        raise AssertionError("nvidia-smi is not asked when CUDA_VISIBLE_DEVICES is set")

    assert detect_gpus({"CUDA_VISIBLE_DEVICES": visible}, which=no_nvidia_smi) == count


def test_without_cuda_visible_devices_the_gpus_are_those_nvidia_smi_lists() -> None:
    calls = []

    def nvidia_smi(arguments, **options):
        calls.append(arguments)
        listing = "GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n  MIG 1g.10gb Device 0: (UUID: MIG-1)\n"
        return subprocess.CompletedProcess(arguments, 0, stdout=listing, stderr="")

    assert detect_gpus({}, which=lambda name: "/usr/bin/nvidia-smi", run=nvidia_smi) == 2
    assert calls == [["/usr/bin/nvidia-smi", "-L"]]  # an argument list, never a shell string


def test_no_gpu_is_detected_without_nvidia_smi_or_when_it_fails() -> None:
    assert detect_gpus({}, which=lambda name: None) == 0

    def failing(arguments, **options):
        return subprocess.CompletedProcess(arguments, 9, stdout="", stderr="NVIDIA-SMI has failed")

    def missing(arguments, **options):
        raise FileNotFoundError(arguments[0])

    def hanging(arguments, **options):
        raise subprocess.TimeoutExpired(arguments, options["timeout"])

    for run in (failing, missing, hanging):
        assert detect_gpus({}, which=lambda name: "/usr/bin/nvidia-smi", run=run) == 0


def test_the_worker_command_takes_slots_and_gpus() -> None:
    args = build_parser().parse_args(["worker", "--slots", "3", "--gpus", "0"])
    assert (args.slots, args.gpus) == (3, 0)
    args = build_parser().parse_args(["worker"])
    assert (args.slots, args.gpus) == (1, None)  # one slot; the GPUs detected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--slots", "0"], "argument --slots: must be at least 1, got 0"),
        (["--slots", "two"], "argument --slots: expected a whole number, got 'two'"),
        (["--gpus", "-1"], "argument --gpus: must be at least 0, got -1"),
        (["--gpus", "1.5"], "argument --gpus: expected a whole number, got '1.5'"),
    ],
)
def test_the_worker_command_refuses_impossible_slots_and_gpus(arguments, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["worker", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
