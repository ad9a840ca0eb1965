# Satchel in a container: the same entry point as under supervisord (`satchel serve`), one
# instance per container. docker-compose.yml runs it with PostgreSQL and MinIO.
# Give it `docker stop --time 40` (compose: stop_grace_period): on SIGTERM it drains running
# archives for up to DRAIN_TIMEOUT (25 s), past docker's default of 10 s.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
COPY setup.py pyproject.toml ./
COPY server ./server
COPY handlers ./handlers
COPY storage ./storage
COPY tasks ./tasks
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin satchel

USER satchel
ENV HOST=0.0.0.0 \
    PORT=8000 \
    LOG_FORMAT=json
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["satchel", "serve"]
