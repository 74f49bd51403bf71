# Builds the `switchyard` binary and ships it in a small Debian image.
#   docker build -t switchyard .
#   docker run -e DATABASE_URL=postgres://... -v $PWD/switchyard.toml:/etc/switchyard/switchyard.toml:ro \
#     -e SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml -p 8080:8080 switchyard
# docker-compose.yml runs it together with PostgreSQL (curl is there for its health check).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin switchyard \
    && cp target/release/switchyard /usr/local/bin/switchyard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/switchyard --create-home switchyard
COPY --from=builder /usr/local/bin/switchyard /usr/local/bin/switchyard
USER switchyard
WORKDIR /var/lib/switchyard
ENV SWITCHYARD_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["switchyard"]
CMD ["serve"]
