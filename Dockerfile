# Isthmus gateway: MLLP on 2575, HTTP (health, later FHIR) on 8080, data in /var/lib/isthmus.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ISTHMUS_STORE__DATA_DIR=/var/lib/isthmus

RUN useradd --system --uid 10001 --home-dir /var/lib/isthmus --create-home isthmus \
    && chmod 0700 /var/lib/isthmus  # the gateway refuses a data dir other users can open

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY mappings ./mappings
RUN pip install . && rm -rf /app/gateway /app/mappings /root/.cache

USER isthmus
EXPOSE 2575 8080
VOLUME ["/var/lib/isthmus"]

# `isthmus health` reads the same config and environment as `serve`, so the check follows
# server.http_port (ISTHMUS_SERVER__HTTP_PORT or the config file) instead of a fixed 8080.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["isthmus", "health", "--timeout", "3"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["isthmus"]
CMD ["serve"]
