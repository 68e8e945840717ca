# Multi-stage: build with the Rust toolchain, run on a small Debian base. The container starts as
# root only so that docker-entrypoint.sh can hand /app/data (a volume Railway mounts root-owned)
# to uid 10001; the service itself always runs as 10001:10001. No VOLUME instruction: Railway
# refuses Dockerfiles that have one, and a volume is attached by the platform (README, Deploying).
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
# ca-certificates is left unpinned (DL3008) on purpose: Debian replaces the package in the archive
# when it updates the CA bundle, so a pinned version would stop the image from building; setpriv
# (util-linux) is Essential in Debian, so it is already there.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 keypooler \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home keypooler \
    && mkdir -p /app/data && chown -R 10001:10001 /app
WORKDIR /app
COPY --from=build /src/target/release/keypooler /usr/local/bin/keypooler
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV DB_PATH=/app/data/pool.db
EXPOSE 8080
# Run through sh, so the script needs no execute bit in the build context.
ENTRYPOINT ["/bin/sh", "/usr/local/bin/docker-entrypoint.sh"]
CMD ["keypooler"]
