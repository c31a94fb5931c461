//! Points `include_bytes_aligned!` at the kernel object built by `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../target/bpfel-unknown-none/release/mirror-ebpf");
    println!("cargo:rerun-if-env-changed=MIRROR_EBPF_OBJECT");
    let object = std::env::var_os("MIRROR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} does not exist.\nBuild the kernel side first with:\n\n    cargo xtask build-ebpf\n\n(`cargo xtask test` and `cargo xtask lab` do it for you.)\n",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=MIRROR_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
