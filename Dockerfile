# meshgw as a container: `docker build -t meshgw .`, then for example
#   docker run --rm -p 8443:8443 -e MESHGW_DC=dc1 -e MESHGW_EXPOSE_SERVERS=1 \
#     -e MESHGW_SERVER="consul-server-0=10.0.1.10:8300" -e MESHGW_GATEWAY="dc2=203.0.113.5:443" meshgw
# Every setting is a MESHGW_<SETTING> variable (MESHGW_ + the settings field name, upper-cased:
# MESHGW_DC, MESHGW_SERVER, MESHGW_GATEWAY, MESHGW_DRAIN_TIMEOUT, ...), or a flag after the
# image name (`docker run meshgw --dc dc1 ...`), or a TOML file given with --config.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MESHGW_LISTEN=0.0.0.0:8443 \
    MESHGW_ADMIN=127.0.0.1:19100 \
    MESHGW_LOG_FORMAT=json

# Only what the package needs (see .dockerignore); the source is removed once installed.
# The slim image has no C compiler: meshgw installs as pure Python here (docs/build.md).
COPY pyproject.toml setup.py README.md /tmp/meshgw/
COPY meshgw /tmp/meshgw/meshgw
RUN pip install /tmp/meshgw \
    && rm -rf /tmp/meshgw \
    && groupadd --system --gid 10001 meshgw \
    && useradd --system --uid 10001 --gid meshgw --no-create-home --shell /usr/sbin/nologin meshgw

# Not root; 8443 needs no privilege (publish it as 443 outside).
USER 10001:10001
EXPOSE 8443

# The admin face listens on 127.0.0.1:19100 by default: inside the container's own network
# namespace, which is where this check runs. slim has no curl, hence Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; h, _, p = os.environ.get('MESHGW_ADMIN', '127.0.0.1:19100').rpartition(':'); h = '127.0.0.1' if h in ('', '0.0.0.0') else h; urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=2)"]

# SIGTERM drains (docker stop's default 10 s grace is shorter than MESHGW_DRAIN_TIMEOUT's 30 s
# default: use `docker stop -t 40`, or lower MESHGW_DRAIN_TIMEOUT).
STOPSIGNAL SIGTERM
ENTRYPOINT ["meshgw", "run"]
