"""What code may run: entry points, Keras configurations and task scripts the operator trusts.

Jobs, policies and stored model versions name code: a builder ``package.module:function``, Keras
classes in an architecture, a task script path. Anyone who can submit a job or write a document
(through the SDK, a raw Kafka client or MongoDB) chooses those names, so each is checked here
against this process's settings, when submitted *and* again by every process before it imports or
runs anything:

- entry points resolve only inside ``trusted_modules`` (whole dotted components: ``mylab`` trusts
  ``mylab.nets``, not ``mylabs``) or the few TensorDB examples in :data:`ALWAYS_TRUSTED`; the
  imported object must be a plain function defined in a trusted module, and receives only the
  arguments its signature declares. This module is the only place that imports one;
- Keras configurations name classes and functions of Keras or of trusted modules only;
- task scripts run only from ``task_script_dirs``, after resolving links, with an environment that
  carries no secrets unless ``task_secrets`` says so.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from tensordb.config import Settings, environment_variables, uri_without_credentials
from tensordb.errors import EntryPointError, UntrustedCodeError

#: TensorDB's own example builders, trusted without configuration (never the whole package).
ALWAYS_TRUSTED = frozenset(
    {"tensordb.models.examples:digits_mlp", "tensordb.models.examples:digits_classifier", "tensordb.stages.examples:pseudo_label"}
)
#: Variables a task script inherits from its worker (with ``LC_*``): where programs, libraries and the
#: GPU are, none a secret. Everything else in the worker's environment stays there.
TASK_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH", "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES"}
)
#: librdkafka options a task script gets without ``task_secrets``: how to reach and trust the brokers
#: and who it is, never a credential, a credential's file (key, keystore, keytab, JWT assertion) or a
#: URL that may carry one (the OAuth token endpoint). An allowlist: an option added later stays out.
PUBLIC_KAFKA_OPTIONS = frozenset(
    {
        "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.kerberos.service.name",
        "sasl.kerberos.principal", "sasl.oauthbearer.method", "sasl.oauthbearer.client.id", "sasl.oauthbearer.scope",
        "ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores",
        "ssl.crl.location", "ssl.endpoint.identification.algorithm", "enable.ssl.certificate.verification",
        "ssl.cipher.suites", "ssl.curves.list", "ssl.sigalgs.list", "broker.address.family", "client.id", "client.rack",
        "socket.keepalive.enable", "message.max.bytes", "api.version.request",
    }
)  # fmt: skip
#: ``package.module:function``: dotted identifiers, one colon, one identifier.
_ENTRY_POINT = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def trusts(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one, by whole dotted components."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


# -- entry points ------------------------------------------------------------------------------------


def check_entry_point(path: object, settings: Settings) -> tuple[str, str]:
    """Refuse an entry point outside the trusted modules, without importing anything.

    Parameters:
        path: ``"package.module:function"`` as a job, policy or model version names it.
        settings: this process's settings (``trusted_modules``).

    Returns the module and function names. Raises :class:`EntryPointError` for a malformed path,
    :class:`~tensordb.errors.UntrustedCodeError` for one outside the trusted modules.
    """
    if not isinstance(path, str) or not _ENTRY_POINT.match(path):
        raise EntryPointError(f"an entry point looks like 'package.module:function'; got {path!r}")
    module, function = path.split(":")
    if path not in ALWAYS_TRUSTED and not trusts(module, settings.trusted_modules):
        trusted = ",".join(settings.trusted_modules) or "none"
        raise UntrustedCodeError(
            f"{path} is outside the trusted modules ({trusted}), so it is not imported: if every function "
            f"of {module} is safe to run with job parameters, add it to TENSORDB_TRUSTED_MODULES on the "
            f"submitting and the running processes (TENSORDB_TRUSTED_MODULES={','.join((*settings.trusted_modules, module))})"
        )
    return module, function


def load_entry_point(path: object, settings: Settings) -> Callable[..., Any]:
    """The function ``path`` names, imported only after :func:`check_entry_point` passed.

    The object found must be a plain Python function whose own module is trusted too: a trusted
    module that did ``from os import system`` does not make ``mylab.models:system`` callable.
    """
    module_name, name = check_entry_point(path, settings)
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise EntryPointError(f"cannot import {path} in this process: install the package that provides it here ({exc})") from exc
    owner = getattr(function, "__module__", None) or ""
    defined_here = owner == module_name if path in ALWAYS_TRUSTED else trusts(owner, settings.trusted_modules)
    if not inspect.isfunction(function) or not defined_here:
        raise UntrustedCodeError(
            f"{path} is a {type(function).__name__} from module {owner or 'unknown'}, not a function defined in a "
            "trusted module, so it is not called: name the builder where it is defined, in a module listed in "
            "TENSORDB_TRUSTED_MODULES"
        )
    return function


def bind_arguments(function: Callable[..., Any], path: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` as keyword arguments of ``function``, refused unless its signature declares them.

    Job hyper-parameters and stored ``builder_kwargs`` are free-form; only names the builder
    declares (or a ``**kwargs`` it declares) reach it.
    """
    signature = inspect.signature(function)
    kinds = {name: parameter.kind for name, parameter in signature.parameters.items()}
    named = sorted(
        name for name, kind in kinds.items() if kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    unknown = [] if inspect.Parameter.VAR_KEYWORD in kinds.values() else sorted(set(arguments) - set(named))
    if unknown:
        raise EntryPointError(
            f"{path} takes no parameters {unknown} (it takes {named or 'none'}): remove them from the "
            "hyper-parameters or builder_kwargs, or declare them in the builder's signature"
        )
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        raise EntryPointError(f"cannot call {path} with {sorted(arguments)}: {exc}") from exc
    return dict(arguments)


def call_entry_point(path: str, arguments: Mapping[str, Any], settings: Settings) -> Any:
    """Check, import and call a builder with the arguments its signature declares; its result."""
    function = load_entry_point(path, settings)
    return function(**bind_arguments(function, path, arguments))


# -- Keras configurations ----------------------------------------------------------------------------


def check_keras_config(config: Any, settings: Settings, what: str) -> None:
    """Refuse a Keras JSON configuration (architecture or compile options) that names a class or
    function outside Keras and the trusted modules.

    Keras imports only its own packages while deserialising, but resolves objects registered with
    ``keras.saving.register_keras_serializable`` by name, from any module this process imported:
    those must come from a trusted module too. ``what`` names the configuration in errors.
    """
    allowed = ("keras", *settings.trusted_modules)
    keras = sys.modules.get("keras")  # without Keras imported, nothing is registered yet
    for node in _values(config):
        if isinstance(node, dict) and isinstance(node.get("module"), str):
            module = node["module"]
            if module != "builtins" and not trusts(module, allowed):  # "builtins": Keras's built-in functions
                _refuse_keras(what, f"{module}.{node.get('class_name')}", module, settings)
        elif isinstance(node, str) and keras is not None:
            registered = keras.saving.get_registered_object(node)
            module = getattr(registered, "__module__", None) or ""
            if registered is not None and not trusts(module, allowed):
                _refuse_keras(what, f"the registered object {node!r}", module or "unknown", settings)


def check_model_spec(spec: Mapping[str, Any], settings: Settings) -> None:
    """Refuse a job's or policy's ``model`` spec that names untrusted code (nothing is imported)."""
    for key in ("entry_point", "epoch_function"):
        if key in spec:
            check_entry_point(spec[key], settings)
    for key in ("architecture", "compile"):
        if key in spec:
            check_keras_config(spec[key], settings, f"the model's {key}")


def _values(config: Any) -> Iterator[Any]:
    stack = [config]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _refuse_keras(what: str, name: str, module: str, settings: Settings) -> None:
    raise UntrustedCodeError(
        f"{what} names {name}, outside Keras and the trusted modules, so it is not built: if module {module} "
        f"is trusted, set TENSORDB_TRUSTED_MODULES={','.join((*settings.trusted_modules, module))}"
    )


# -- task scripts --------------------------------------------------------------------------------------


def check_submitted_job(kind: str, model: Mapping[str, Any] | None, script: str | None, settings: Settings) -> None:
    """The submit-time check of a job: its model spec, and its task script when the submitter's
    settings list script directories (workers check again with theirs)."""
    check_model_spec(model or {}, settings)
    if kind == "task" and script and settings.task_script_dirs:  # JobKind.TASK (jobs sit above this layer)
        resolve_task_script(script, settings)


def resolve_task_script(script: str, settings: Settings) -> Path:
    """The real path of a task script, refused unless it lies inside ``task_script_dirs``.

    Links are resolved first (``os.path.realpath``), so a link inside a listed directory that
    points elsewhere is refused. No directories listed: every task script is refused.
    """
    if not settings.task_script_dirs:
        raise UntrustedCodeError(
            f"task script {script} is not run: this process runs no task scripts until its operator lists the "
            "directories they may come from, e.g. TENSORDB_TASK_SCRIPT_DIRS=/srv/tensordb/tasks (comma separated)"
        )
    resolved = os.path.realpath(os.path.expanduser(script))
    directories = [os.path.realpath(directory) for directory in settings.task_script_dirs]
    if not any(os.path.commonpath([resolved, directory]) == directory for directory in directories):
        raise UntrustedCodeError(
            f"task script {script} (resolved to {resolved}) is outside the task script directories "
            f"({', '.join(directories)}), so it is not run: move it into one of them, or add its directory to "
            "TENSORDB_TASK_SCRIPT_DIRS where the workers run"
        )
    return Path(resolved)


def task_environment(settings: Settings, job_id: str, parent: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a task script's process, built from nothing but its arguments.

    Parameters:
        settings: the worker's settings. Handed on as ``TENSORDB_*`` variables so that the script
            can connect back, never with the HTTP and metrics tokens (every ``SecretStr`` field)
            and, unless ``settings.task_secrets``, with the MongoDB URI's user info and secret
            options removed and only :data:`PUBLIC_KAFKA_OPTIONS` of the Kafka options.
        job_id: the job, as ``TENSORDB_JOB_ID``.
        parent: the worker's environment, of which only :data:`TASK_ENVIRONMENT` and ``LC_*`` pass.

    Nothing is read again from the environment (where ``TENSORDB_KAFKA_OPTIONS`` holds the secrets).
    """
    environment = {key: value for key, value in parent.items() if key in TASK_ENVIRONMENT or key.startswith("LC_")}
    fields = {name: value for name, value in settings if not isinstance(value, SecretStr)}
    if not settings.task_secrets:
        fields["mongo_uri"] = uri_without_credentials(settings.mongo_uri)
        fields["kafka_options"] = {key: value for key, value in settings.kafka_options.items() if key in PUBLIC_KAFKA_OPTIONS}
    return {**environment, **environment_variables(fields), "TENSORDB_JOB_ID": job_id}
