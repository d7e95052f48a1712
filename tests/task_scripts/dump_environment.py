# A task script that reports the environment it was given: tests/security checks no secret reaches it.
import os

environment = dict(os.environ)
