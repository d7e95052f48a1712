"""Runs: the step logger, reading logs back, and the Keras callback that logs every step."""
