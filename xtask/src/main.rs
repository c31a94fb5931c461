//! Project tasks: `cargo xtask <task>`. Each task installs what it needs first, saying what.

mod bench;
mod bench_content;
mod bench_full;
mod bench_h2;
mod bench_record;
mod bench_responses;
mod bench_tls;
mod lab;
mod prereq;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel program (nightly, bpfel-unknown-none, bpf-linker).
    BuildEbpf,
    /// Build the kernel program and the agent (release).
    Build,
    /// Build everything and run every test, including the root-only end-to-end tests, the
    /// kernel-dependent ones inside Debian 6.1 under qemu (`vm-test --suite ci`) and the
    /// DaemonSet's container inside 5.10 (`vm-test --kernel 5.10 --suite container`).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the agent in a real container (podman + runc) under the DaemonSet's security context
    /// (also part of `test`).
    ContainerTest,
    /// Run the end-to-end suites inside Debian's 5.10, 6.1 or 6.12 kernels under qemu (`test`
    /// runs the `ci` suite on 6.1 and the `container` suite on 5.10).
    VmTest(vm::VmTestArgs),
    /// Run the traffic-mirroring lab locally: V2, V3 (slow), V4 (faulty) and V5 (wrong content,
    /// beside a secondary V1) candidates.
    Lab(lab::LabArgs),
    /// Benchmark the full path against nginx's in-path `mirror` (figures only).
    Bench(bench_full::FullBenchArgs),
    /// Run the fuzz targets (nightly, cargo-fuzz) for a while each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Benchmark the capture path: no program, program only, program + agent (figures only).
    BenchCapture(bench::CaptureBenchArgs),
    /// Benchmark HTTP/2 mirroring next to HTTP/1.1: fidelity and agent CPU per request, h2load
    /// at a fixed rate (figures only).
    BenchH2(bench_h2::H2BenchArgs),
    /// What capturing responses costs the live service with large responses: heads, whole
    /// clones, none.
    BenchResponses(bench_responses::ResponsesBenchArgs),
    /// What comparing contents (`--compare-bodies`) costs the agent per request, with 2 KiB
    /// and 64 KiB JSON bodies, against the comparison off (figures only).
    BenchContent(bench_content::ContentBenchArgs),
    /// What --record costs on top of mirroring, and replay --speed max's throughput.
    BenchRecord(bench_record::RecordBenchArgs),
    /// What reading TLS plaintext from uprobes costs a live nginx terminating TLS, and the
    /// agent (figures only).
    BenchTls(bench_tls::TlsBenchArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::BuildEbpf => build_ebpf(&root),
        Task::Build => {
            build_ebpf(&root)?;
            build_agent(&root)
        }
        Task::Test { args } => test(&root, &args),
        Task::ContainerTest => container_test(&root),
        Task::VmTest(args) => {
            e2e_prerequisites(&root)?;
            let outcome = vm::run_matrix(&root, &args)?;
            println!(
                "tests: {} passed, {} failed",
                outcome.passed, outcome.failed
            );
            Ok(())
        }
        Task::Fuzz { seconds } => fuzz(&root, seconds, Build::Optimised),
        Task::Bench(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            run(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "mirror-agent",
                "-p",
                "bookservice",
            ]))?;
            bench_full::run(&root, &args)
        }
        Task::Lab(args) => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the lab creates network namespaces and loads BPF: run `cargo xtask lab` as root");
            }
            prereq::ensure_test_tools()?;
            build_ebpf(&root)?;
            run(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "mirror-agent",
                "-p",
                "bookservice",
            ]))?;
            lab::run(&root, &args)
        }
        Task::BenchCapture(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench::capture(&root, &args)
        }
        Task::BenchH2(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench_h2::run(&root, &args)
        }
        Task::BenchResponses(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench_responses::run(&root, &args)
        }
        Task::BenchContent(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench_content::run(&root, &args)
        }
        Task::BenchRecord(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench_record::run(&root, &args)
        }
        Task::BenchTls(args) => {
            prereq::ensure_bench_tools()?;
            build_ebpf(&root)?;
            build_agent(&root)?;
            bench_tls::run(&root, &args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn build_ebpf(root: &Path) -> Result<()> {
    prereq::ensure_ebpf_toolchain()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("mirror-ebpf"))
        .args(["+nightly", "build", "--release"]);
    // Running under stable, cargo exports RUSTUP_TOOLCHAIN and friends; the child must use the
    // eBPF crate's own nightly toolchain and settings instead.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd).context("building mirror-ebpf")
}

fn build_agent(root: &Path) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-p", "mirror-agent"]))
}

/// Tells the end-to-end tests that a missing root is a failure, not a reason to skip.
const REQUIRE_ROOT: &str = "MIRROR_TEST_REQUIRE_ROOT";

/// What every end-to-end run needs: the kernel program, the tools, root.
fn e2e_prerequisites(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    prereq::ensure_test_tools()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the end-to-end tests create network namespaces, load BPF and run containers: run `cargo xtask test` as root");
    }
    Ok(())
}

fn container_test(root: &Path) -> Result<()> {
    e2e_prerequisites(root)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "test",
        "--release",
        "-p",
        "mirror-agent",
        "--test",
        "container_e2e",
    ]);
    cmd.env(REQUIRE_ROOT, "1");
    let (passed, failed) = run_counting_tests(&mut cmd)?;
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    e2e_prerequisites(root)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["test", "--workspace", "--release", "--"])
        .args(extra)
        .env(REQUIRE_ROOT, "1");
    let (mut passed, mut failed) = run_counting_tests(&mut cmd)?;
    if extra.is_empty() {
        fuzz(root, 20, Build::Quick)?;
        // The kernel-dependent tests again on a kernel without tcx, as most nodes still run,
        // and the DaemonSet's container on 5.10, which charges BPF maps to the memlock limit.
        for (kernel, suite) in [("6.1", vm::Suite::Ci), ("5.10", vm::Suite::Container)] {
            let vm = vm::run_matrix(
                root,
                &vm::VmTestArgs {
                    kernel: kernel.into(),
                    suite,
                    test: None,
                },
            )?;
            passed += vm.passed;
            failed += vm.failed;
        }
    }
    // The closing line CI reads.
    println!("tests: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("{cmd:?} failed with {status}");
    }
    Ok((passed, failed))
}

/// How the fuzz targets are built (fuzz/Cargo.toml's profiles): the fuzzed code, mirror-core
/// and libFuzzer are optimised either way.
#[derive(Clone, Copy)]
enum Build {
    /// The rest unoptimised: builds in a third of the time, runs about two thirds as fast
    /// (`cargo xtask test`'s 20 s per target).
    Quick,
    /// The rest at a lower level: for long runs (`cargo xtask fuzz`).
    Optimised,
}

/// Runs each fuzz target in fuzz/ for `seconds`; a crash fails the run.
fn fuzz(root: &Path, seconds: u64, build: Build) -> Result<()> {
    build_ebpf(root)?;
    prereq::ensure_cargo_fuzz()?;
    let dir = root.join("fuzz");
    for target in ["segments", "frames", "h2", "recording"] {
        // New inputs go to corpus/ (not committed); seeds/ holds hand-made valid conversations.
        let corpus = format!("corpus/{target}");
        let seeds = format!("seeds/{target}");
        std::fs::create_dir_all(dir.join(&corpus))?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir)
            .args(["+nightly", "fuzz", "run", target, &corpus])
            .arg(match build {
                Build::Quick => "--dev",
                Build::Optimised => "-O",
            });
        if dir.join(&seeds).is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-print_final_stats=1"])
            .env_remove("RUSTUP_TOOLCHAIN");
        run(&mut cmd).with_context(|| format!("fuzz target {target}"))?;
    }
    Ok(())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
