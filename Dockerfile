# One image with both binaries, in /usr/local/bin:
#   pgkeep           the engine, the in-pod agent (`pgkeep agent`), and the
#                    binary the init container copies into PostgreSQL's pods
#   pgkeep-operator  the Kubernetes operator
#
#   docker build -t registry.example.com/pgkeep:0.1.0 .
#
# The binaries link glibc dynamically (Debian 12): the copied `pgkeep` runs in
# the Debian-based official postgres images, not in the -alpine ones.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgkeep -p pgkeep-operator

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgkeep /src/target/release/pgkeep-operator /usr/local/bin/
# Not root by default. The agent sidecar runs as the postgres image's user
# instead (runAsUser: 999 in deploy/examples/postgres.yaml), to read PGDATA.
USER 65532:65532
CMD ["pgkeep-operator"]
