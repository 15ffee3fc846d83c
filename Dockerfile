# LMGate image: one image for both compose services, `lmgate` (the sidecar) and `nginx` (the front);
# docker-compose.yaml picks the entrypoint of each.
#
# Debian 12 (bookworm), as on CI, and the very install script a developer runs (scripts/setup.sh):
# nginx-light + libnginx-mod-http-js from Debian (nginx 1.22.1, njs 0.7.9) and Python 3.11 with
# LMGate in a venv, so production runs the nginx/njs that the tests ran.
FROM debian:bookworm-slim

# No pip or uv cache in the image; Python logs reach `docker compose logs` at once.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/lmgate/venv/bin:$PATH

# The repository layout is kept under /app: the editable install finds nginx/ beside lmgate/.
# .dockerignore keeps data/, run/, .venv, .git and caches out of the image: ./data is bind-mounted.
WORKDIR /app
COPY . /app

# The same install script as the local path: apt installs (--no-install-recommends, lists removed
# afterwards on a fresh image) and the venv with uv.lock's runtime set (no dev extra). uv itself
# is installed for the build only, into /tmp/lmgate-uv, and removed.
RUN LMGATE_VENV=/opt/lmgate/venv LMGATE_UV_DIR=/tmp/lmgate-uv scripts/setup.sh \
    && rm -rf /tmp/lmgate-uv \
    && python -m compileall -q /app/lmgate

# Run as a fixed non-root user, uid/gid 10001. The host's ./data (allow-list in, stats out) must
# be writable by the uid the container runs as: `sudo chown -R 10001:10001 data`, or run the
# services as your own uid with LMGATE_UID/LMGATE_GID in .env (docker-compose.yaml's `user:`).
# The empty /app/data is only a mount point (a named volume mounted there starts owned by 10001);
# it holds nothing that a bind mount would hide.
# The code stays root-owned and read-only for the user, whatever the checkout's umask was.
RUN groupadd --gid 10001 lmgate \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin lmgate \
    && chmod -R a+rX,go-w /app \
    && install -d -o 10001 -g 10001 /app/data /app/data/spool
USER 10001:10001

# The sidecar: HTTP 8081 (/auth, /livez, /readyz). The front: HTTP 8080. Which of them is
# published is docker-compose.yaml's business; the two share ./data/spool (nginx writes, the
# sidecar reads).
EXPOSE 8080 8081

# Both entrypoints `exec` the Python process, which handles SIGTERM: the sidecar flushes its
# buffered stats, `lmgate nginx` stops nginx gracefully.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/scripts/entrypoint-sidecar.sh"]
