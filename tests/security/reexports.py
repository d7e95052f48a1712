"""A module the security tests trust that imports dangerous functions from elsewhere: trusting a
module must not make what it imported callable as ``tests.security.reexports:system``."""

from os import system  # noqa: F401 - re-exported on purpose
from subprocess import getoutput  # noqa: F401 - a plain Python function, defined in subprocess
