"""One error tree: every error TensorDB raises derives from TensorDBError, grouped by what to do."""

from __future__ import annotations

import inspect

from tensordb import errors


def test_every_error_class_lives_in_errors_and_derives_from_the_base() -> None:
    classes = [value for value in vars(errors).values() if inspect.isclass(value) and issubclass(value, Exception)]
    assert all(issubclass(cls, errors.TensorDBError) and cls.__module__ == "tensordb.errors" for cls in classes)


def test_errors_are_grouped_by_what_the_caller_can_do() -> None:
    families = {
        errors.BadInputError: [errors.ValidationError, errors.DecodeError, errors.RecordTooLargeError, errors.QueryError,
                               errors.ProjectScopeError, errors.SampleError, errors.ArrayCodecError, errors.ModelFormatError,
                               errors.JobSpecError, errors.PolicyError, errors.EntryPointError],
        errors.ConfigurationError: [errors.UntrustedCodeError],
        errors.UnreachableError: [errors.DeliveryError, errors.FatalClientError],
        errors.NotFoundError: [errors.ModelNotFoundError],
    }  # fmt: skip
    for family, members in families.items():
        assert all(issubclass(member, family) for member in members), family
    assert issubclass(errors.BadInputError, ValueError) and issubclass(errors.NotFoundError, LookupError)
