# rtunnel: the relay (`serve`) or the agent (`dial`) in a small image.
#   docker build -t rtunnel .
#   docker run -p 8080:8080 -p 8443:8443 -e RTUNNEL_TOKEN rtunnel                      # a relay
#   docker run -e RTUNNEL_TOKEN rtunnel dial wss://relay.example.com:8443 --upstream host.docker.internal:5000 --admin 0.0.0.0:9180
# The health check asks the admin endpoint, so keep an --admin on port 9180 in any command you give.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY protocol ./protocol
COPY rtunnel ./rtunnel
RUN pip install --no-compile . \
    && rm -rf /src \
    && groupadd --system --gid 10001 rtunnel \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin rtunnel

# numeric, so that the runtime can tell it is not root without the image's /etc/passwd
USER 10001:10001
WORKDIR /
EXPOSE 8080 8443 9180

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9180/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["rtunnel"]
CMD ["serve", "--http", "0.0.0.0:8080", "--agents", "0.0.0.0:8443", "--admin", "127.0.0.1:9180"]
