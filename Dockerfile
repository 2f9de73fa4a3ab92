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

# Not root; 8443 needs no privilege (publish it as 443 outside). Kernel tunnels (--pump sockmap,
# or auto's promotion) need CAP_BPF and CAP_NET_ADMIN held effective, which a non-root user
# cannot get here: `docker run --user 0 --cap-drop ALL --cap-add BPF --cap-add NET_ADMIN ...`.
# Without them meshgw says why once and moves bytes with splice and userspace
# (docs/operations.md#kernel-tunnels).
USER 10001:10001
EXPOSE 8443

# `meshgw health --pid 1` reads the settings of the gateway (PID 1: its flags after the image
# name, its MESHGW_* variables, its --config file) the way `meshgw run` loaded them, and asks
# its admin face for /healthz: the check follows MESHGW_ADMIN, `docker run meshgw --admin ...`
# and a config file alike. It runs in the container's own network namespace, so the default
# 127.0.0.1:19100 is reachable (a 0.0.0.0 admin is asked on 127.0.0.1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["meshgw", "health", "--pid", "1"]

# SIGTERM deregisters, keeps accepting for MESHGW_DRAIN_DELAY (5 s), then drains for
# MESHGW_DRAIN_TIMEOUT (30 s). docker stop's default 10 s grace is shorter: use
# `docker stop -t 45`, or lower the two.
STOPSIGNAL SIGTERM
ENTRYPOINT ["meshgw", "run"]
