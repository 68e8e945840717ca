# Multi-stage: build with the Rust toolchain, run on a small Debian base as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
# The repo's release profile keeps line tables for profiling; the image does not need them.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app keypooler \
    && mkdir -p /app/data && chown -R keypooler /app
WORKDIR /app
COPY --from=build /src/target/release/keypooler /usr/local/bin/keypooler
USER keypooler
ENV DB_PATH=/app/data/pool.db
VOLUME ["/app/data"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keypooler"]
