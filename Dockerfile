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

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status == 200 else 1)"

STOPSIGNAL SIGTERM
ENTRYPOINT ["isthmus"]
CMD ["serve"]
