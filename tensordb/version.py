"""TensorDB's version from one place: pyproject's ``version``, as installed (``importlib.metadata``).

Its own module so that the CLI can print it without importing the package's public facade
(``tensordb/__init__.py`` names TensorHub, a layer the CLI may not reach).
"""

from importlib.metadata import version

__version__ = version("tensordb")
