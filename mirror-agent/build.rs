//! Points `include_bytes_aligned!` at the kernel object built by `cargo xtask build-ebpf`.
//! Without the object the agent still builds (so that `cargo check` and the tests of the
//! stages need neither nightly nor bpf-linker), warns, and refuses to load at run time.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../target/bpfel-unknown-none/release/mirror-ebpf");
    println!("cargo:rerun-if-env-changed=MIRROR_EBPF_OBJECT");
    println!("cargo::rustc-check-cfg=cfg(ebpf_object_missing)");
    let object = std::env::var_os("MIRROR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    match object.canonicalize() {
        Ok(path) if path.is_file() => {
            println!("cargo:rustc-env=MIRROR_EBPF_OBJECT={}", path.display())
        }
        _ => {
            println!(
                "cargo:warning=no eBPF object at {}: this agent cannot attach; build the kernel side first with `cargo xtask build-ebpf` (`cargo xtask build`, `test` and `lab` do)",
                object.display()
            );
            println!("cargo:rustc-cfg=ebpf_object_missing");
        }
    }
}
