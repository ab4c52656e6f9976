# syntax=docker/dockerfile:1
# One static, non-root image for both roles: `crosstrace controller` and `crosstrace agent`.
#
#   docker build -t <registry>/crosstrace:0.1.0 .

FROM rust:1.95-bookworm AS build
# musl-gcc: the C parts of the dependencies (ring) are compiled for musl too, so the binary is fully static.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TARGET_DIR=/build/target
WORKDIR /build
# The toolchain pinned by rust-toolchain.toml, with the musl target; its own layer, cached across source changes.
COPY rust-toolchain.toml ./
RUN rustup toolchain install && rustup target add x86_64-unknown-linux-musl
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/crosstrace /crosstrace

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /crosstrace /crosstrace
USER 65532:65532
ENTRYPOINT ["/crosstrace"]
