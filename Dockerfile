# OPQ Box Update Server. No pip install: the server is one file with no dependencies.
# Any image with python3 (3.7 or later) on PATH is a base: nothing is installed and no account is created,
# so Alpine- and Debian-based images alike work, e.g. --build-arg BASE_IMAGE=python:3.13-slim.
ARG BASE_IMAGE=python:3.13-alpine
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="OPQ Box Update Server" \
      org.opencontainers.image.description="Serves software updates to OPQ Boxes"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /box-update-server
# Readable by the unprivileged user whatever the mode of the checked-out file (a umask of 077 makes it 0600).
COPY --chmod=0644 box_update_server.py ./

# Unprivileged, by number: Python needs no account, so no base-specific adduser/useradd.
USER 8151:8151
# No VOLUME: without the -v mount of the updates folder the server refuses to start ("updates folder
# /updates is missing") instead of serving an empty anonymous volume and calling itself healthy.
EXPOSE 8151

# OPQ Health's own probe, from the Python in the image (no curl needed): unhealthy when "ok" is false.
# Podman and buildah keep it only in the docker image format: podman build --format docker.
HEALTHCHECK --interval=20s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "box_update_server.py", "health"]

# Exec form: python3 is PID 1 and gets docker stop's SIGTERM, then stops gracefully with exit 0.
ENTRYPOINT ["python3", "box_update_server.py"]
