# The TensorDB image: the library, stream processors and workers behind one `tensordb` command.
# docker-compose.yml runs it with a sub-command per container (`topics create`, `processors`, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY tensordb/ tensordb/
COPY streams/ streams/
COPY workers/ workers/
COPY schemas/ schemas/
# Every dependency at the version the tests ran with; all of them ship manylinux wheels, so the
# slim image needs no compiler.
RUN pip install --no-cache-dir -c constraints.txt .

# Run unprivileged, from a home directory the processes may write to.
RUN useradd --create-home --uid 10001 tensordb
USER tensordb
WORKDIR /home/tensordb

ENTRYPOINT ["tensordb"]
