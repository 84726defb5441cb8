# syntax=docker/dockerfile:1
# The `mailqueue` binary in a small Debian image.
#
#   docker build -t mailqueue .
#   docker run --rm -v "$PWD/mailqueue.yaml:/etc/mailqueue/mailqueue.yaml:ro" -p 8080:8080 mailqueue
#
# The configuration is read from /etc/mailqueue/mailqueue.yaml; its `api.listen` must be "0.0.0.0:8080" (or
# "[::]:8080") to be reachable from outside the container and by the health check below. docker-compose.yml runs two
# instances against PostgreSQL.

# --- Build --------------------------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The caches keep downloaded crates and compiled dependencies between builds; the binary is copied out of the cached
# target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mailqueue-engine \
    && install -D -m 0755 target/release/mailqueue /out/mailqueue

# --- Run ----------------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to Microsoft 365 (OAuth2, IMAP, SMTP) and to PostgreSQL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mailqueue \
    && useradd --system --uid 10001 --gid mailqueue --home-dir /var/lib/mailqueue --create-home \
       --shell /usr/sbin/nologin mailqueue
COPY --from=builder /out/mailqueue /usr/local/bin/mailqueue
USER 10001:10001
# The working directory is the mailqueue user's own: a configuration with the default SQLite URL
# (sqlite://data/mailqueue.db) writes to /var/lib/mailqueue/data, which a volume can keep.
WORKDIR /var/lib/mailqueue
EXPOSE 8080
# The image has no curl: bash (always in Debian) sends the request itself. /healthz needs no token.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r -t 4 status <&3 && [[ $status == HTTP/1.?' 200'* ]]"]
ENTRYPOINT ["mailqueue"]
CMD ["serve", "--config", "/etc/mailqueue/mailqueue.yaml"]
