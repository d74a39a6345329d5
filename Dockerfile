# vyora-router container: built with the same `cargo build --release --locked` that CI runs.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked \
    && mkdir -p /out/data

# distroless/cc: glibc and libgcc only, no shell, no package manager, no OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/vyora-router /usr/local/bin/vyora-router
COPY --from=build /src/config/router.toml /etc/vyora-router/router.toml
COPY --from=build --chown=65532:65532 /out/data /data
# The config's relative paths (data/router.db, data/events.jsonl) resolve under /data.
WORKDIR /
VOLUME ["/data"]
ENV VYORA_ROUTER_SERVER__LISTEN=0.0.0.0:8080
# The admin listener (metrics, readiness) stays on the container's loopback unless
# VYORA_ROUTER_ADMIN__LISTEN says otherwise; the health check probes it there.
EXPOSE 8080
USER 65532:65532
# The binary probes its own /healthz, so the image needs no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/vyora-router", "healthcheck", "--config", "/etc/vyora-router/router.toml"]
ENTRYPOINT ["/usr/local/bin/vyora-router"]
CMD ["serve", "--config", "/etc/vyora-router/router.toml"]
