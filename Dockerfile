# OPQ Box Update Server. No pip install: the server is one file with no dependencies.
FROM python:3.13-alpine

LABEL org.opencontainers.image.title="OPQ Box Update Server" \
      org.opencontainers.image.description="Serves software updates to OPQ Boxes"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /box-update-server
COPY box_update_server.py ./

# An unprivileged user; the updates folder is mounted read-only at /updates.
RUN addgroup -S -g 8151 box-update \
    && adduser -S -D -H -u 8151 -G box-update -s /sbin/nologin box-update
USER 8151:8151
VOLUME ["/updates"]
EXPOSE 8151

# OPQ Health's own probe, from the Python in the image (alpine has no curl): unhealthy when "ok" is false.
HEALTHCHECK --interval=20s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "box_update_server.py", "health"]

# Exec form: python3 is PID 1 and gets docker stop's SIGTERM, then stops gracefully with exit 0.
ENTRYPOINT ["python3", "box_update_server.py"]
