# The TensorDB image: every application (stream processors, workers and the model server, the
# dashboard with its built front end) behind one `tensordb` command. docker-compose.yml runs it
# with a sub-command per container (`topics create`, `processors`, ...).

# Stage 1: the dashboard's front end (uPlot from package-lock.json, our ES modules) built by npm.
FROM node:20-slim AS dashboard
WORKDIR /src/dashboard/web
COPY dashboard/web/package.json dashboard/web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY dashboard/web/ ./
RUN npm run --silent build

# Stage 2: the Python packages, with the built front end copied in (no Node.js in the image).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
# One line per top-level package (tests/unit/test_docker.py checks the list against what the CLI imports).
COPY tensordb/ tensordb/
COPY streams/ streams/
COPY workers/ workers/
COPY dashboard/ dashboard/
COPY schemas/ schemas/
COPY --from=dashboard /src/dashboard/static/ dashboard/static/
# Every dependency at the version the tests ran with; all of them ship manylinux wheels, so the
# slim image needs no compiler.
RUN pip install --no-cache-dir -c constraints.txt .

# Run unprivileged, from a home directory the processes may write to.
RUN useradd --create-home --uid 10001 tensordb
USER tensordb
WORKDIR /home/tensordb

ENTRYPOINT ["tensordb"]
