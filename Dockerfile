# Multi-stage build: the agent, its eBPF object and the demo bookservice, in a slim image.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
        llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src \
    && LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
       cargo install bpf-linker --version 0.13.0 --locked --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo xtask build-ebpf \
    && cargo build --release -p mirror-agent -p bookservice

FROM debian:bookworm-slim
# The agent speaks rtnetlink itself: no iproute2 in the image.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/mirror-agent /src/target/release/bookservice /src/target/release/poller /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/mirror-agent"]
