# A task script that runs until it is killed (for cancellation).
import time

time.sleep(seconds)  # noqa: F821
