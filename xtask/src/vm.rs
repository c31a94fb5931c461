//! `cargo xtask vm-test`: the end-to-end suites inside Debian's own kernels, booted under qemu
//! on the host's root filesystem by virtme-ng. The kernels are Debian's packages, fetched with
//! a private apt configuration (5.10 lives in bullseye), so the host's apt setup is untouched.
//! KVM guests hang on these machines: qemu runs in TCG, slowly, and the tests are told so
//! (`MIRROR_TEST_EMULATED`) to skip, saying so, what cannot hold under emulation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{prereq, run};

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// The kernel to boot: 5.10 (bullseye), 6.1 (bookworm), 6.12 (bookworm's newer kernel), or
    /// all of them.
    #[arg(long, default_value = "6.1")]
    pub kernel: String,
    /// `ci`: the tests that depend on the kernel most (attach, capture, a killed agent) in a
    /// few minutes; `container`: the agent under the DaemonSet's security context in podman;
    /// `full`: every end-to-end binary (`tests/*_e2e.rs`), timing assertions skipped.
    #[arg(long, value_enum, default_value_t = Suite::Full)]
    pub suite: Suite,
    /// Only the suite's tests whose names contain this (to rerun one test on a kernel).
    #[arg(long)]
    pub test: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// The tests that depend on the kernel most: attach, capture, a killed agent.
    Ci,
    /// The agent in a real container under the DaemonSet's security context.
    Container,
    /// Every end-to-end test binary (`tests/*_e2e.rs`).
    Full,
}

/// A kernel of the matrix: its name, where Debian keeps it, and how its package is named.
struct Kernel {
    name: &'static str,
    /// A regular expression for `apt-cache search --names-only`.
    package: &'static str,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
    },
    Kernel {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    },
    Kernel {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
    },
];

/// One suite run in the guest: a test binary and, for `ci`, the tests picked from it.
struct Run {
    binary: String,
    filters: &'static [&'static str],
}

/// The runs of `suite`, given the test binaries built.
fn runs(suite: Suite, binaries: &[(String, PathBuf)]) -> Vec<Run> {
    let whole = |binary: &str| Run {
        binary: binary.to_string(),
        filters: &[],
    };
    match suite {
        Suite::Ci => vec![Run {
            binary: "capture_e2e".into(),
            filters: &[
                "captured_bytes_equal_what_client_sent_v4_and_v6",
                "segments_of_every_record_size_are_captured_whole",
                "nothing_left_after_sigterm_or_sigkill",
                "a_killed_or_frozen_agents_program_goes_inert",
            ],
        }],
        Suite::Container => vec![whole("container_e2e")],
        Suite::Full => {
            let mut names: Vec<&str> = binaries
                .iter()
                .map(|(name, _)| name.as_str())
                .filter(|name| name.ends_with("_e2e"))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(whole).collect()
        }
    }
}

/// Passed and failed counts of one kernel's run.
pub struct Outcome {
    pub passed: u64,
    pub failed: u64,
}

pub fn run_matrix(root: &Path, args: &VmTestArgs) -> Result<Outcome> {
    let kernels: Vec<&Kernel> = if args.kernel == "all" {
        KERNELS.iter().collect()
    } else {
        match KERNELS.iter().find(|k| k.name == args.kernel) {
            Some(k) => vec![k],
            None => bail!(
                "--kernel {}: give one of {} or all",
                args.kernel,
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    };
    prereq::ensure_vm_tools()?;
    let binaries = test_binaries(root)?;
    let dir = root.join("target/vm");
    let apt = PrivateApt::new(&dir.join("apt"))?;
    let mut lines = Vec::new();
    let mut total = Outcome {
        passed: 0,
        failed: 0,
    };
    for k in kernels {
        let image = apt.kernel_image(k, &dir)?;
        let started = Instant::now();
        let results = boot_and_test(
            root,
            &image,
            &binaries,
            &runs(args.suite, &binaries),
            args.test.as_deref(),
        )?;
        let (passed, failed) = results
            .iter()
            .fold((0, 0), |(p, f), r| (p + r.passed, f + r.failed));
        let detail: Vec<String> = results.iter().map(SuiteResult::summary).collect();
        let line = format!(
            "vm-test {} ({}): {passed} passed, {failed} failed in {:.0?} [{}]",
            k.name,
            image.file_name().unwrap_or_default().to_string_lossy(),
            Duration::from_secs(started.elapsed().as_secs()),
            detail.join("; ")
        );
        lines.push(line);
        total.passed += passed;
        total.failed += failed;
    }
    for line in &lines {
        println!("{line}");
    }
    Ok(total)
}

/// The e2e test binaries by name, built first.
fn test_binaries(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--release",
            "-p",
            "mirror-agent",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|v| v == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            msg["executable"].as_str(),
            msg["target"]["name"].as_str(),
        ) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// An apt configuration of our own: Debian's bullseye and bookworm lists, kept under
/// `target/vm/apt`, so that the host's sources and lists stay as they are.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path) -> Result<PrivateApt> {
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let mirror = host_debian_mirror();
        let security = format!("{mirror}-security");
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let opts = if Path::new(keyring).exists() {
            format!("[signed-by={keyring}]")
        } else {
            "[trusted=yes]".to_string()
        };
        std::fs::write(
            dir.join("sources.list"),
            format!(
                "deb {opts} {mirror} bullseye main\ndeb {opts} {mirror} bookworm main\n\
                 deb {opts} {security} bookworm-security main\n"
            ),
        )?;
        let apt = PrivateApt {
            dir: dir.to_path_buf(),
        };
        // The lists are a few MB; refreshed once a day.
        let fresh = std::fs::metadata(dir.join("updated"))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(86_400));
        if !fresh {
            eprintln!(
                "xtask: fetching Debian's package lists (bullseye, bookworm) for the kernels"
            );
            run(apt.command("apt-get").args(["update", "-q"]))?;
            std::fs::write(dir.join("updated"), "")?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = self.dir.display();
        for opt in [
            format!("Dir::Etc::sourcelist={d}/sources.list"),
            "Dir::Etc::sourceparts=/dev/null".to_string(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            // The download goes to a root-owned directory.
            "APT::Sandbox::User=root".to_string(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd
    }

    /// The newest package of `k`'s series, downloaded and unpacked once: its `vmlinuz`.
    fn kernel_image(&self, k: &Kernel, dir: &Path) -> Result<PathBuf> {
        let out = self
            .command("apt-cache")
            .args(["search", "--names-only", k.package])
            .output()?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        names.sort_by_key(|n| version_key(n));
        let Some(package) = names.pop() else {
            bail!(
                "no package matches {} in Debian's lists (see {})",
                k.package,
                self.dir.join("sources.list").display()
            );
        };
        let unpacked = dir.join(&package);
        let boot = unpacked.join("boot");
        if !boot.exists() {
            let debs = dir.join("debs");
            std::fs::create_dir_all(&debs)?;
            eprintln!("xtask: downloading {package}");
            run(self
                .command("apt-get")
                .current_dir(&debs)
                .args(["download", "-q", &package]))?;
            let deb = std::fs::read_dir(&debs)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                })
                .with_context(|| format!("{package}: the download left no .deb"))?;
            let partial = dir.join(format!("{package}.partial"));
            let _ = std::fs::remove_dir_all(&partial);
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
            std::fs::rename(&partial, &unpacked)?;
            std::fs::remove_file(&deb)?;
        }
        std::fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz in {}", boot.display()))
    }
}

/// Numbers in a package name, in order, for picking the newest.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The Debian mirror the host uses (deb.debian.org if none is found).
fn host_debian_mirror() -> String {
    let mut texts = Vec::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        texts.extend(std::fs::read_to_string(f).ok());
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .flat_map(|l| l.split_whitespace())
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .map(|w| w.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

struct SuiteResult {
    binary: String,
    passed: u64,
    failed: u64,
    /// Why the counts are incomplete (a timeout, a crash), if they are.
    problem: Option<String>,
    /// Tests that failed, by name.
    failures: Vec<String>,
    /// Tests that passed with timing assertions skipped under emulation, by name.
    timing_skipped: Vec<String>,
}

impl SuiteResult {
    /// `capture_e2e 5/5 (timing skipped: a, b)`, with failures and problems named.
    fn summary(&self) -> String {
        let mut notes = Vec::new();
        if let Some(p) = &self.problem {
            notes.push(p.clone());
        }
        if !self.failures.is_empty() {
            notes.push(format!("failed: {}", self.failures.join(", ")));
        }
        if !self.timing_skipped.is_empty() {
            notes.push(format!(
                "timing skipped: {}",
                self.timing_skipped.join(", ")
            ));
        }
        let counts = format!(
            "{} {}/{}",
            self.binary,
            self.passed,
            self.passed + self.failed
        );
        if notes.is_empty() {
            counts
        } else {
            format!("{counts} ({})", notes.join("; "))
        }
    }
}

/// Minutes a suite may take in the guest before it is stopped and counted as failed.
const SUITE_MINUTES: u64 = 25;

fn boot_and_test(
    root: &Path,
    image: &Path,
    binaries: &[(String, PathBuf)],
    runs: &[Run],
    only: Option<&str>,
) -> Result<Vec<SuiteResult>> {
    let out = tempfile::tempdir()?;
    let dir = out.path();
    let kept = root.join("target/vm/logs").join(
        image
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .as_ref(),
    );
    let mut script = String::from(
        "#!/bin/sh\n\
         export MIRROR_TEST_EMULATED=1 MIRROR_TEST_REQUIRE_ROOT=1 RUST_BACKTRACE=0\n\
         mount -t bpf bpf /sys/fs/bpf 2>/dev/null\n\
         modprobe tun 2>/dev/null\n",
    );
    script.push_str(&format!("cd {}\n", root.join("mirror-agent").display()));
    for r in runs {
        let exe = binaries
            .iter()
            .find(|(name, _)| *name == r.binary)
            .with_context(|| format!("no test binary {}", r.binary))?;
        let log = dir.join(format!("{}.log", r.binary));
        let filters = match only {
            Some(name) => format!(" '{}'", name.replace('\'', "")),
            None if r.filters.is_empty() => String::new(),
            None => format!(" --exact {}", r.filters.join(" ")),
        };
        script.push_str(&format!(
            // --nocapture: a test's skip lines follow its name in the log.
            "timeout {} {} --test-threads=1 --nocapture{filters} > {log} 2>&1\necho \"exit $?\" >> {log}\n",
            SUITE_MINUTES * 60,
            exe.1.display(),
            log = log.display()
        ));
    }
    let script_path = dir.join("run.sh");
    std::fs::write(&script_path, script)?;
    run(Command::new("chmod").arg("+x").arg(&script_path))?;
    let console = dir.join("console.log");
    eprintln!("xtask: booting {} under qemu (TCG)", image.display());
    let status = Command::new("vng")
        .arg("-r")
        .arg(image)
        .args([
            "--disable-kvm",
            "--verbose",
            "--memory",
            "4G",
            "--cpus",
            "2",
            "--rwdir",
        ])
        .arg(dir)
        .arg("--exec")
        .arg(&script_path)
        .stdout(std::fs::File::create(&console)?)
        .stderr(std::fs::File::create(dir.join("vng.stderr"))?)
        .status()
        .context("running vng (virtme-ng)")?;
    if !status.success() {
        // vng may report a failure as the guest powers off: the guest's logs are what count,
        // and a suite without a result line is a failure below.
        let console = std::fs::read_to_string(dir.join("vng.stderr")).unwrap_or_default();
        let last: Vec<&str> = console.lines().rev().take(3).collect();
        eprintln!("xtask: vng exited with {status}; the console ended with: {last:?}");
    }
    eprintln!("xtask: the guest's logs are kept in {}", kept.display());
    Ok(runs
        .iter()
        .map(|r| {
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", r.binary))).unwrap_or_default();
            // Kept for reading after the run: what each test printed, passed or not.
            let _ = std::fs::create_dir_all(&kept)
                .and_then(|()| std::fs::write(kept.join(format!("{}.log", r.binary)), &log));
            let result = parse_log(&r.binary, &log);
            if result.failed > 0 || result.problem.is_some() {
                eprintln!("---- {} in the guest ----\n{log}", r.binary);
            }
            result
        })
        .collect())
}

/// Counts from a test binary's output; a run that printed no result line failed whole. With
/// one test thread and `--nocapture`, what a test prints comes after its `test NAME ... ` and
/// before its status.
fn parse_log(binary: &str, log: &str) -> SuiteResult {
    let mut result = SuiteResult {
        binary: binary.to_string(),
        passed: 0,
        failed: 0,
        problem: None,
        failures: Vec::new(),
        timing_skipped: Vec::new(),
    };
    let mut current: Option<&str> = None;
    for line in log.lines() {
        let status = match line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            Some((name, rest)) => {
                current = Some(name);
                rest.trim()
            }
            None => line.trim(),
        };
        if let Some(name) = current {
            if line.contains("skipped under emulation") {
                if result.timing_skipped.last().map(String::as_str) != Some(name) {
                    result.timing_skipped.push(name.to_string());
                }
            } else if status == "FAILED" || status.ends_with(" FAILED") {
                result.failures.push(name.to_string());
                current = None;
            } else if status == "ok" || status.ends_with(" ok") {
                current = None;
            }
        }
    }
    let Some(line) = log.lines().find_map(|l| l.strip_prefix("test result: ")) else {
        let exit = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("exit "))
            .unwrap_or("none");
        result.failed = 1;
        result.problem = Some(match exit {
            "124" => format!("stopped after {SUITE_MINUTES} min"),
            "none" => "never ran".to_string(),
            code => format!("no result, exit {code}"),
        });
        return result;
    };
    let count = |word: &str| -> u64 {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    };
    result.passed = count("passed");
    result.failed = count("failed");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_from_the_result_line_or_the_run_failed() {
        let ok = parse_log(
            "capture_e2e",
            "running 2 tests\ntest result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 9.1s\nexit 0\n",
        );
        assert_eq!((ok.passed, ok.failed, ok.problem), (2, 0, None));
        let failed = parse_log(
            "capture_e2e",
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\nexit 101\n",
        );
        assert_eq!((failed.passed, failed.failed), (1, 2));
        let timed_out = parse_log("h2_e2e", "running 4 tests\nexit 124\n");
        assert_eq!(timed_out.failed, 1);
        assert_eq!(timed_out.problem.as_deref(), Some("stopped after 25 min"));
        assert_eq!(parse_log("x", "").problem.as_deref(), Some("never ran"));
    }

    #[test]
    fn each_tests_skips_and_failures_are_named() {
        let log = "running 3 tests\n\
            test fast_one ... skipped under emulation (qemu TCG): latency\n\
            skipped under emulation (qemu TCG): throughput\n\
            ok\n\
            test plain ... ok\n\
            test broken ... some output\n\
            FAILED\n\
            test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
            exit 101\n";
        let r = parse_log("pressure_e2e", log);
        assert_eq!((r.passed, r.failed), (2, 1));
        assert_eq!(r.timing_skipped, ["fast_one"]);
        assert_eq!(r.failures, ["broken"]);
        assert_eq!(
            r.summary(),
            "pressure_e2e 2/3 (failed: broken; timing skipped: fast_one)"
        );
    }

    #[test]
    fn the_newest_package_wins() {
        let mut names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.1.0-10-amd64",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-56-amd64"));
    }
}
