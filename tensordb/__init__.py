"""TensorDB: database infrastructure for continuous machine learning.

    from tensordb import TensorDB, Policy, Settings

The public names below are imported on first use (PEP 562): every stream processor imports
``tensordb.config``, which runs this file first, and must not pay for Keras, the workers or
TensorHub. ``__version__`` is pyproject's ``version`` as installed (``tensordb.version``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; the same names as _EXPORTS (tests/test_public_api.py)
    from tensordb.client import TensorDB as TensorDB
    from tensordb.compat.tensorhub import TensorHub as TensorHub
    from tensordb.config import Settings as Settings
    from tensordb.config import Topic as Topic
    from tensordb.config import load_settings as load_settings
    from tensordb.data.cohorts import Cohort as Cohort
    from tensordb.data.datasets import Datasets as Datasets
    from tensordb.errors import BadInputError as BadInputError
    from tensordb.errors import ConfigurationError as ConfigurationError
    from tensordb.errors import DeliveryError as DeliveryError
    from tensordb.errors import IntegrityError as IntegrityError
    from tensordb.errors import JobError as JobError
    from tensordb.errors import ModelNotFoundError as ModelNotFoundError
    from tensordb.errors import NotFoundError as NotFoundError
    from tensordb.errors import PolicyError as PolicyError
    from tensordb.errors import ProjectScopeError as ProjectScopeError
    from tensordb.errors import QueryError as QueryError
    from tensordb.errors import StudyError as StudyError
    from tensordb.errors import StudyNotFoundError as StudyNotFoundError
    from tensordb.errors import StudySpecError as StudySpecError
    from tensordb.errors import TensorDBError as TensorDBError
    from tensordb.errors import UnreachableError as UnreachableError
    from tensordb.errors import UntrustedCodeError as UntrustedCodeError
    from tensordb.errors import ValidationError as ValidationError
    from tensordb.jobs.queue import Jobs as Jobs
    from tensordb.loop.policies import Policies as Policies
    from tensordb.loop.policies import Policy as Policy
    from tensordb.models.registry import ModelRegistry as ModelRegistry
    from tensordb.runs.keras_callback import TensorDBCallback as TensorDBCallback
    from tensordb.runs.logger import RunLogger as RunLogger
    from tensordb.studies.studies import Study as Study
    from tensordb.version import __version__ as __version__

#: Each public name and the module that defines it.
_EXPORTS = {
    # the SDK and TensorLayer's API
    "TensorDB": "tensordb.client",
    "TensorHub": "tensordb.compat.tensorhub",
    # settings
    "Settings": "tensordb.config",
    "load_settings": "tensordb.config",
    "Topic": "tensordb.config",
    # data, runs, models, jobs and the loop
    "Cohort": "tensordb.data.cohorts",
    "Datasets": "tensordb.data.datasets",
    "RunLogger": "tensordb.runs.logger",
    "TensorDBCallback": "tensordb.runs.keras_callback",
    "ModelRegistry": "tensordb.models.registry",
    "Jobs": "tensordb.jobs.queue",
    "Policy": "tensordb.loop.policies",
    "Policies": "tensordb.loop.policies",
    "Study": "tensordb.studies.studies",
    # errors
    "TensorDBError": "tensordb.errors",
    "ConfigurationError": "tensordb.errors",
    "ValidationError": "tensordb.errors",
    "QueryError": "tensordb.errors",
    "ProjectScopeError": "tensordb.errors",
    "IntegrityError": "tensordb.errors",
    "DeliveryError": "tensordb.errors",
    "UntrustedCodeError": "tensordb.errors",
    "BadInputError": "tensordb.errors",
    "NotFoundError": "tensordb.errors",
    "UnreachableError": "tensordb.errors",
    "ModelNotFoundError": "tensordb.errors",
    "JobError": "tensordb.errors",
    "PolicyError": "tensordb.errors",
    "StudyError": "tensordb.errors",
    "StudySpecError": "tensordb.errors",
    "StudyNotFoundError": "tensordb.errors",
    "__version__": "tensordb.version",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tensordb' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
