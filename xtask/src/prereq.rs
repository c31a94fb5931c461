//! Checks for the tools the project needs and installs the missing ones, saying what it installs.
//! The facts behind the versions are in shared/notes/ebpf-toolchain.md.

use std::process::{Command, Stdio};
use std::sync::Once;

use anyhow::{bail, Result};

use crate::run;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_APT: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];

pub fn ensure_ebpf_toolchain() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!(
            "the nightly toolchain is missing: install it with `rustup toolchain install nightly \
             --component rust-src` (the kernel side needs -Z build-std)"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly (needed by -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        if !std::path::Path::new(LLVM_PREFIX)
            .join("bin/llvm-config")
            .exists()
        {
            eprintln!(
                "xtask: installing LLVM 22 development files for bpf-linker: {}",
                LLVM_APT.join(" ")
            );
            apt_install(LLVM_APT, false)?;
        }
        eprintln!("xtask: installing bpf-linker 0.13 against LLVM 22 (about a minute)");
        // bpf-linker's build script reads LLVM_PREFIX (else the first llvm-config on PATH, which
        // may be another LLVM); llvm-sys reads LLVM_SYS_221_PREFIX.
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

/// Tools the end-to-end tests and the lab drive: iproute2 (namespaces, veth, tc), curl (the
/// client), iptables (the lab's Service address with --rollout), nghttp2's h2load and Debian's
/// grpcio and h2 for Python (the HTTP/2 peers), Prometheus and promtool (the rules, the fleet's
/// table), Chromium (the agent's page), and podman with runc for the container test (crun
/// refuses this kind of host's hybrid cgroups). podman comes with its recommended packages, as a
/// user installs it.
pub fn ensure_test_tools() -> Result<()> {
    // A tool is a command on PATH, or an absolute path that a package installs.
    let missing = |tools: &[(&str, &'static str)]| -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for (bin, pkg) in tools {
            let present = if bin.starts_with('/') {
                std::path::Path::new(bin).exists()
            } else {
                on_path(bin)
            };
            if !present && !out.contains(pkg) {
                out.push(pkg);
            }
        }
        out
    };
    let plain = missing(&[
        ("ip", "iproute2"),
        ("tc", "iproute2"),
        ("curl", "curl"),
        ("iptables", "iptables"),
        // The TLS suites: nginx linked with OpenSSL 3 (libssl.so.3) and the certificates' tool.
        ("nginx", "nginx"),
        ("openssl", "openssl"),
        ("h2load", "nghttp2-client"),
        ("/usr/lib/python3/dist-packages/grpc", "python3-grpcio"),
        ("/usr/lib/python3/dist-packages/h2", "python3-h2"),
        // The rules' checks and unit tests (its promtool), and the fleet's table in a real
        // Prometheus; the agent's page rendered in a real browser.
        ("prometheus", "prometheus"),
        ("chromium", "chromium"),
    ]);
    if !plain.is_empty() {
        eprintln!("xtask: installing test tools: {}", plain.join(" "));
        apt_install(&plain, false)?;
    }
    let containers = missing(&[
        ("podman", "podman"),
        ("runc", "runc"),
        ("newuidmap", "uidmap"),
    ]);
    if !containers.is_empty() {
        eprintln!(
            "xtask: installing the container runtime: {}",
            containers.join(" ")
        );
        apt_install(&containers, true)?;
    }
    Ok(())
}

pub fn ensure_cargo_fuzz() -> Result<()> {
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("xtask: installing cargo-fuzz (libFuzzer driver) from crates.io");
        run(Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

/// Load tools for the benchmarks: nginx, wrk and tcpdump from apt, oha from crates.io.
pub fn ensure_bench_tools() -> Result<()> {
    ensure_test_tools()?;
    install_missing(
        "benchmark tools",
        &[("nginx", "nginx"), ("wrk", "wrk"), ("tcpdump", "tcpdump")],
    )?;
    if !on_path("oha") {
        eprintln!("xtask: installing oha (fixed-rate load generator) from crates.io");
        run(Command::new("cargo")
            .args(["install", "oha", "--locked"])
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

/// What `vm-test` boots kernels with: qemu, and virtme-ng (from PyPI) with the host tools it
/// uses to build the guest's initramfs (busybox, depmod, file).
pub fn ensure_vm_tools() -> Result<()> {
    install_missing(
        "the VM tools",
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("depmod", "kmod"),
            ("file", "file"),
        ],
    )?;
    if !on_path("vng") {
        eprintln!("xtask: installing virtme-ng (vng) from PyPI");
        let pip = |extra: &[&str]| {
            run(Command::new("python3")
                .args(["-m", "pip", "install", "-q", "virtme-ng"])
                .args(extra))
        };
        // Debian's own Python refuses system-wide installs unless told (PEP 668).
        if pip(&[]).is_err() {
            if !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
                apt_install(&["python3-pip"], false)?;
            }
            pip(&["--break-system-packages"])?;
        }
        if !on_path("vng") && !std::path::Path::new("/usr/local/bin/vng").exists() {
            bail!("virtme-ng installed, but `vng` is not on PATH: add pip's script directory");
        }
    }
    Ok(())
}

/// Installs from apt the packages of the `(command, package)` pairs whose command is neither
/// on PATH nor in /usr/sbin.
fn install_missing(what: &str, tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !on_path(bin) && !std::path::Path::new("/usr/sbin").join(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {what}: {}", missing.join(" "));
        apt_install(&missing, false)?;
    }
    Ok(())
}

fn apt_install(pkgs: &[&str], recommends: bool) -> Result<()> {
    static UPDATE: Once = Once::new();
    let mut update = Ok(());
    UPDATE.call_once(|| update = run(Command::new("apt-get").args(["update", "-q"])));
    update?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q"]);
    if !recommends {
        cmd.arg("--no-install-recommends");
    }
    run(cmd.args(pkgs).env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
