//! The command line, in the library so that tests (and the Kubernetes manifests' test) can
//! check arguments with the same parser the binary uses.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use hyper::header::{HeaderName, HeaderValue};
use regex::Regex;

use crate::capture::{AttachMode, Hook};
use crate::compare::gate::Condition;
use crate::compare::RouteTemplate;
use crate::redact::{Pattern, RedactError, RedactRules, Redactor};
use crate::replay::secrets::{SecretError, SecretHeader, SecretSpec};
use crate::replay::writes::{WriteAction, WritePolicy, WriteRoute};
use crate::replay::{self, HostMode};

#[derive(Parser, Debug)]
#[command(
    name = "mirror-agent",
    version,
    about = "Kernel-level HTTP traffic mirroring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to a live service's interface and mirror its traffic.
    Attach(Box<AttachArgs>),
    /// Print the comparison table of a running agent (started with --metrics).
    Report(ReportArgs),
    /// Send a recording (attach --record DIR) to a mirror again and compare as live mirroring
    /// does, the recorded live responses being the live side.
    Replay(Box<ReplayArgs>),
    /// Write a recording out in another format.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The recording's directory.
    pub dir: PathBuf,

    /// Where to send: http://host:port[/prefix].
    #[arg(long)]
    pub mirror: String,

    /// Pace: a factor on the recorded timing (2.0 sends twice as fast), or `max`.
    #[arg(long, default_value = "1")]
    pub speed: crate::record::playback::Speed,

    /// Play the recording this many times in a row.
    #[arg(long = "loop", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub loops: u32,

    /// Most requests per second, whatever the speed (later ones wait).
    #[arg(long)]
    pub max_rps: Option<f64>,

    /// Connections to the mirror: `same` (one per recorded connection) or a number; each
    /// recorded connection's requests stay in order on one of them.
    #[arg(long, default_value = "same")]
    pub connections: crate::record::playback::Lanes,

    #[command(flatten)]
    pub requests: RequestArgs,

    #[command(flatten)]
    pub series: SeriesArgs,

    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,

    #[command(flatten)]
    pub gate: GateArgs,
}

/// What fails a pipeline that runs `report` or `replay`, and its JUnit file.
#[derive(Args, Debug)]
pub struct GateArgs {
    /// Exit with status 3, the reasons on standard error, when an endpoint on a mirror shows
    /// one of these (comma-separated): `failure` (a 5xx or transport error where live
    /// succeeded), `mismatch` (another status code than live's, failures included),
    /// `regression` (fields that differ, with --compare-bodies), `slower` (over twice live's
    /// mean and 100 ms more) or `slower=F` (a mean over F times live's, and 1 ms more). A
    /// report in which no request was paired with live fails as well: it checked nothing.
    #[arg(long, value_delimiter = ',')]
    pub fail_on: Vec<Condition>,

    /// Write JUnit XML to this file: a test suite per mirror, a test case per endpoint, failed
    /// by --fail-on's conditions (without it, by any finding).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

/// How the comparison names its rows: the same for live mirroring (`attach`) and for a
/// recording sent again (`replay`, where live is the recorded responses).
#[derive(Args, Debug)]
pub struct SeriesArgs {
    /// Version tag of the live service's rows, e.g. V1MIR-LiveBookService.
    #[arg(long, default_value = "live")]
    pub live_label: String,

    /// Version tag of the rows of a mirror given without a name, e.g. V4MIR-BookServiceFault.
    #[arg(long, default_value = "mirror")]
    pub mirror_label: String,

    /// Endpoint template naming matching paths, e.g. /api/{tenant}/books (repeatable).
    #[arg(long = "route")]
    pub routes: Vec<RouteTemplate>,
}

/// Which requests go to the mirror and how they are written: the same for live mirroring
/// (`attach`) and for a recording sent again (`replay`).
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// Host header sent to the mirror: `mirror` (its own authority), `keep` (the original), or
    /// `shadow` (the original with -shadow appended, as Envoy does).
    #[arg(long, value_enum, default_value_t = HostMode::Mirror)]
    pub host: HostMode,

    /// Header added to every request sent (NAME:VALUE; repeatable).
    #[arg(long = "add-header", value_parser = parse_header)]
    pub add_headers: Vec<(HeaderName, HeaderValue)>,

    /// Header removed from every request sent (and from what `attach --record` writes), e.g.
    /// Authorization or Cookie (repeatable).
    #[arg(long = "drop-header")]
    pub drop_headers: Vec<HeaderName>,

    /// The path sent, rewritten: REGEX=REPLACEMENT, the first match replaced (`$1` for a
    /// group), e.g. '^/api/v1/=/api/v2/'. The query is kept.
    #[arg(long = "rewrite-path", value_parser = crate::replay::rewrite::parse_path_rewrite)]
    pub rewrite_path: Option<(Regex, String)>,

    /// Query parameter set on every request sent, replacing the client's (NAME=VALUE;
    /// repeatable).
    #[arg(long = "set-query", value_parser = parse_query_param)]
    pub set_query: Vec<(String, String)>,

    /// Query parameter removed from every request sent (repeatable).
    #[arg(long = "drop-query")]
    pub drop_query: Vec<String>,

    /// Only these methods (comma-separated, e.g. GET,HEAD).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,

    /// Only requests whose path (without the query) matches this regex.
    #[arg(long)]
    pub path: Option<Regex>,

    /// Where writes go (requests whose method is not safe: POST, PUT, PATCH, DELETE, ...):
    /// `mirror` (to every mirror, as Envoy does), `skip` (to none; counted), or
    /// `only:NAME[+NAME]` (only to these named mirrors, e.g. a candidate with a database of its
    /// own). The agent logs the policy at start.
    #[arg(long, default_value = "mirror")]
    pub writes: WriteAction,

    /// A header whose value is read from a file, replacing the client's copy: NAME: [PREFIX]@FILE,
    /// e.g. 'Authorization: Bearer @/run/secrets/staging-token' (a mounted Secret), so that a
    /// candidate gets its own credentials and never production's. Re-read every second; a file
    /// that cannot be read keeps the last value, with a warning (repeatable).
    #[arg(long = "secret-header", value_name = "SPEC")]
    pub secret_headers: Vec<SecretSpec>,

    /// Mark every request sent to a mirror: this header (e.g. X-Mirrored) with the mirror's name
    /// as its value, and a `mirror-shadow=NAME` entry added to W3C `baggage` (after the
    /// client's own), so that a candidate, and the services it calls, can tell mirrored requests
    /// and suppress side effects. A copy of either header sent by the client is replaced.
    #[arg(long, value_name = "HEADER")]
    pub mark: Option<HeaderName>,

    /// The write policy on paths (without the query) matching a regex, ahead of --writes:
    /// REGEX=ACTION, e.g. '^/payments=skip' or '^/pkg.Books/(Get|List)=mirror' for gRPC reads,
    /// which are POSTs (repeatable; the first match decides).
    #[arg(long = "writes-route")]
    pub writes_routes: Vec<WriteRoute>,

    /// Seconds a request sent to the mirror may take before it counts as a timeout.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,

    /// With an https mirror: trust only the CA certificates in this PEM file (default: the
    /// system's roots).
    #[arg(long, value_name = "FILE")]
    pub mirror_ca: Option<PathBuf>,

    /// With an https mirror that asks for a client certificate (mTLS): the certificate chain,
    /// PEM (with --mirror-key).
    #[arg(long, value_name = "FILE", requires = "mirror_key")]
    pub mirror_cert: Option<PathBuf>,

    /// The private key of --mirror-cert, PEM.
    #[arg(long, value_name = "FILE", requires = "mirror_cert")]
    pub mirror_key: Option<PathBuf>,

    /// With an https mirror: accept any certificate. For test setups only; the mirror's
    /// identity is then not checked at all.
    #[arg(long, conflicts_with = "mirror_ca")]
    pub mirror_insecure: bool,
}

impl RequestArgs {
    /// How the agent speaks TLS to https mirrors.
    pub fn tls_options(&self) -> replay::TlsOptions {
        replay::TlsOptions {
            ca: self.mirror_ca.clone(),
            client_cert: self.mirror_cert.clone().zip(self.mirror_key.clone()),
            insecure: self.mirror_insecure,
        }
    }

    /// Headers never written to a recording nor shown in a diff: --drop-header's, and the
    /// client's copies of --secret-header's (credentials the candidate gets its own of).
    pub fn kept_private(&self) -> Vec<HeaderName> {
        let mut names = self.drop_headers.clone();
        names.extend(self.secret_headers.iter().map(|s| s.name.clone()));
        names
    }

    /// Reads each `--secret-header` file: a missing or bad one fails the start.
    pub fn secret_headers(&self) -> Result<Vec<Arc<SecretHeader>>, SecretError> {
        self.secret_headers
            .iter()
            .cloned()
            .map(SecretHeader::load)
            .collect()
    }

    /// The write policy of every mirror (`--writes`, `--writes-route`).
    pub fn write_policy(&self) -> WritePolicy {
        WritePolicy {
            default: self.writes.clone(),
            routes: self.writes_routes.clone(),
        }
    }

    /// How requests go to `mirror`, named `name`; the stage's caps keep their defaults.
    pub fn replay_config(&self, mirror: hyper::Uri, name: &str) -> replay::ReplayConfig {
        replay::ReplayConfig {
            writes: self.write_policy().for_mirror(name),
            mark: self
                .mark
                .clone()
                .map(|header| replay::Mark::new(header, name)),
            host: self.host,
            add_headers: self.add_headers.clone(),
            drop_headers: self.drop_headers.clone(),
            rewrite: crate::replay::rewrite::TargetRewrite {
                path: self.rewrite_path.clone(),
                set_query: self.set_query.clone(),
                drop_query: self.drop_query.clone(),
            },
            methods: self
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            path: self.path.clone(),
            timeout: std::time::Duration::from_secs_f64(self.timeout),
            ..replay::ReplayConfig::new(mirror)
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The recording's directory.
    pub dir: PathBuf,

    /// Write HAR 1.2 to this file (`-` for standard output).
    #[arg(long)]
    pub har: PathBuf,
}

#[derive(Args, Debug)]
pub struct RedactArgs {
    /// The HMAC key for redaction, a file of 16 bytes or more (a mounted Secret): a redacted
    /// value becomes REDACTED-<the first 12 hex digits of its keyed hash>, equal for equal
    /// values, so diffs still tell equal from changed; without the key it cannot be guessed.
    #[arg(long, value_name = "FILE")]
    pub redact_key: Option<PathBuf>,

    /// A header whose value is redacted whole (repeatable).
    #[arg(long = "redact-header", value_name = "NAME")]
    pub headers: Vec<String>,

    /// A query parameter whose value is redacted (repeatable).
    #[arg(long = "redact-query", value_name = "PARAM")]
    pub query: Vec<String>,

    /// A JSON path whose value is redacted whole, named as content diffs name paths, e.g.
    /// '$.card' or '$.items[*].email' (repeatable).
    #[arg(long = "redact-json", value_name = "PATH")]
    pub json_paths: Vec<String>,

    /// A pattern redacted wherever it appears in text (header values, targets, JSON strings and
    /// keys, text bodies): `email`, `card` (13-19 digits passing the Luhn check), `token` (JWTs,
    /// common API-key shapes), or a regex (repeatable).
    #[arg(long = "redact-pattern", value_name = "PATTERN", value_parser = Pattern::parse)]
    pub patterns: Vec<Pattern>,
}

impl RedactArgs {
    pub fn redactor(&self) -> Result<Option<Redactor>, RedactError> {
        let rules = RedactRules {
            headers: self.headers.clone(),
            query: self.query.clone(),
            json_paths: self.json_paths.clone(),
            patterns: self.patterns.clone(),
        };
        Redactor::from_key_file(self.redact_key.as_deref(), rules)
    }
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// Interface(s) that the live service's traffic crosses (comma-separated).
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["pod_ip", "selector", "tls_pid", "traffic_mirrors"])]
    pub iface: Vec<String>,

    /// Live pod address(es) (comma-separated): the agent finds the host-side veth that routes to
    /// each, attaches to its egress (traffic towards the pod), and mirrors only that pod.
    #[arg(long, value_delimiter = ',')]
    pub pod_ip: Vec<IpAddr>,

    /// Mirror this node's pods that match a Kubernetes label selector (e.g. app=bookservice),
    /// following them as they come and go: each Ready pod's host veth is attached when it
    /// appears and detached when it goes. Pods in a service mesh (Istio sidecar or ambient,
    /// Linkerd), whose wire carries mTLS, are attached inside their network namespace instead
    /// (see --in-pod). Uses the in-cluster ServiceAccount, or KUBECONFIG.
    #[arg(long, group = "watches")]
    pub selector: Option<String>,

    /// Mirror what the TrafficMirror objects in the Kubernetes API declare
    /// (deploy/trafficmirror-crd.yaml): each object's pods on this node, its candidates, its
    /// rules, added, changed and removed as the objects are, with this node's entry written in
    /// each object's status. Uses the in-cluster ServiceAccount, or KUBECONFIG.
    #[arg(long, group = "watches", conflicts_with = "config")]
    pub traffic_mirrors: bool,

    /// Attach inside each pod's own network namespace, on its `lo`, instead of on its host veth:
    /// where a mesh proxy or a TLS-terminating sidecar hands the application plaintext. The
    /// namespace is found by the pod's address (among /proc/*/ns/net and /var/run/netns), which
    /// needs the node's processes (hostPID) or netns files, and CAP_SYS_ADMIN to enter it.
    #[arg(long)]
    pub in_pod: bool,

    /// With --selector or --traffic-mirrors: only pods (and TrafficMirrors) in this namespace
    /// (default: all namespaces).
    #[arg(long, requires = "watches")]
    pub namespace: Option<String>,

    /// With --selector or --traffic-mirrors: this node's name, so that only its pods are
    /// watched, and the name of its entry in TrafficMirror statuses (set NODE_NAME from the
    /// downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", requires = "watches")]
    pub node_name: Option<String>,

    /// Live service port(s) (comma-separated), read on the wire.
    #[arg(long, value_delimiter = ',', required_unless_present = "tls_port", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Port(s) on which the selected processes serve TLS themselves (comma-separated): their
    /// plaintext is read around OpenSSL's SSL_read/SSL_write by uprobes on libssl, not on the
    /// wire. The processes: --tls-pid, and those in the network namespaces of --pod-ip pods.
    /// Needs the node's processes (hostPID) and CAP_SYS_ADMIN (or CAP_PERFMON with CAP_BPF).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub tls_port: Vec<u16>,

    /// With --tls-port: processes whose TLS is read, by pid (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "tls_port")]
    pub tls_pid: Vec<u32>,

    /// Hook that requests to the service cross: `ingress` on the service's own interface,
    /// `egress` on the host side of a pod's veth. Responses are read on the other hook.
    #[arg(long, value_enum, default_value_t = Hook::Ingress)]
    pub direction: Hook,

    /// Only mirror traffic to these service addresses (comma-separated; default: any).
    #[arg(long = "addr", value_delimiter = ',')]
    pub addrs: Vec<IpAddr>,

    /// Do not capture the live service's responses (no live timings or status codes).
    #[arg(long)]
    pub no_responses: bool,

    /// How the live service's responses reach the agent. `heads`: the kernel describes each
    /// response segment (flow, sequence, length and its first 256 bytes) in a ring buffer
    /// instead of cloning it, and clones whole only the connections that need it (HTTP/2,
    /// chunked bodies), which spares the live path the cost of cloning response bodies.
    /// Connection opens and closes are described too, and every clone is marked in the same
    /// ring, so the agent sees everything in the kernel's order. `full`: clone every response
    /// segment (`--dump` implies it).
    #[arg(long, value_enum, default_value_t = ResponseCapture::Heads)]
    pub response_capture: ResponseCapture,

    /// How the kernel hands the segments it mirrors whole (requests, and responses that are
    /// needed whole) to the agent. `records`: it copies their payload into a ring buffer, the
    /// cheapest for the live path; segments over 4 KiB (uploads sent as GSO super-packets) are
    /// cloned. `clones`: it clones every one onto the agent's mirror interface.
    #[arg(long, value_enum, default_value_t = Delivery::Records)]
    pub delivery: Delivery,

    /// Percentage of TCP connections to mirror, decided per connection in the kernel.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent)]
    pub sample: f64,

    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach_mode: AttachMode,

    /// Capture ring size in MiB (1 MiB blocks).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(2..=1024))]
    pub ring_mb: u32,

    /// Ring blocks of this many KiB instead of 1 MiB (--ring-mb then counts blocks): tests use
    /// a tiny ring to force capture drops.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u32).range(64..=1024))]
    pub ring_block_kb: Option<u32>,

    /// The kernel's records ring (heads, marks and request records) of this many KiB, a power
    /// of two: tests use a tiny one to force drops there.
    #[arg(long, hide = true, value_parser = parse_ring_kb)]
    pub records_ring_kb: Option<u32>,

    /// Record every extracted request (HTTP/1) and its live response's status and timing in
    /// this directory, for `mirror-agent replay` and `export`. Alone or with --mirror;
    /// --drop-header applies to what is written. Never slows the pipeline: what the disk cannot
    /// take is dropped and counted.
    #[arg(long)]
    pub record: Option<PathBuf>,

    /// A recording file is closed and a new one started past this size.
    #[arg(long, default_value = "64M", value_parser = crate::memory_budget::parse_size)]
    pub record_file_size: u64,

    /// ... or past this many seconds.
    #[arg(long, default_value_t = 600)]
    pub record_file_seconds: u64,

    /// The oldest recording files are removed to keep the directory under this size.
    #[arg(long, default_value = "1G", value_parser = crate::memory_budget::parse_size)]
    pub record_max_size: u64,

    #[command(flatten)]
    pub redact: RedactArgs,

    /// Write the captured streams, per flow, to this file on exit.
    #[arg(long)]
    pub dump: Option<PathBuf>,

    /// Most payload bytes that --dump holds; the rest is counted as dropped.
    #[arg(long, default_value_t = 512 << 20)]
    pub dump_max_bytes: usize,

    /// Forward the kernel program's debug log (aya-log) to this process's log.
    #[arg(long)]
    pub ebpf_log: bool,

    /// Mirror service to replay requests to: a URL (http://bookservicemirror:8080) or
    /// NAME=URL (cand=http://v5:8080). Repeatable: every request goes to every mirror, each
    /// with its own queue, caps and counters, and its rows tagged with its name. Without it
    /// the agent only captures and extracts (see --dump).
    #[arg(long, value_parser = parse_mirror)]
    pub mirror: Vec<MirrorArg>,

    /// A YAML file of TrafficMirror objects (deploy/trafficmirror-crd.yaml has their schema):
    /// mirrorings declared next to --mirror's, each with its own candidates, rewrites, write
    /// policy and rows. Read again when it changes or on SIGHUP: mirrorings are added, changed
    /// and removed without a restart; a file that does not parse changes nothing.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where declared mirrorings that ask (`spec.record`) are recorded, each in
    /// DIR/NAMESPACE/NAME, with --record-file-size, --record-file-seconds and
    /// --record-max-size each.
    #[arg(long, value_name = "DIR")]
    pub record_mirrorings: Option<PathBuf>,

    #[command(flatten)]
    pub requests: RequestArgs,

    /// Most mirrored requests per second (token bucket); the rest are dropped and counted.
    #[arg(long)]
    pub max_rps: Option<f64>,

    /// Most mirrored requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,

    /// HTTP/1 requests written to the mirror at once on one connection, at most, when they
    /// are waiting (pipelining; the depth adapts to the mirror's speed). Roughly halves the
    /// agent's CPU per request. Only the first answer of a batch is timed; the others count for
    /// their status. 1 turns pipelining off, for a mirror that mishandles it.
    #[arg(
        long,
        default_value_t = replay::DEFAULT_PIPELINE_DEPTH,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub pipeline_depth: u16,

    /// Bytes of requests waiting to be mirrored at most (e.g. 64M); when full, new ones are
    /// dropped and counted. Default: a fifth of what --memory-budget leaves for traffic.
    #[arg(long, value_parser = crate::memory_budget::parse_size)]
    pub queue_bytes: Option<u64>,

    /// Memory the agent may use in all (e.g. 384M, 1G): the flow table, buffers, replay queue
    /// and comparison are sized from it. Default: three quarters of the cgroup (pod) memory
    /// limit, or 1G without one.
    #[arg(long, value_parser = crate::memory_budget::parse_size)]
    pub memory_budget: Option<u64>,

    /// CPU the agent may use, in cores (e.g. 0.5): its threads and its kernel program's work in
    /// the live path (clones, records). Over it, or falling behind, the agent lowers
    /// the share of new connections the kernel mirrors (whole connections, never one in part);
    /// with headroom it raises it back, up to --sample. Default: the cgroup's (pod's) CPU limit;
    /// none without one.
    #[arg(long, value_parser = parse_cores)]
    pub cpu_budget: Option<f64>,

    /// Mirror with spare CPU only: while the live service's CPU pressure (the share of time
    /// some of its tasks waited for a CPU, PSI) is above this, the share of new connections
    /// mirrored falls; it comes back once the pressure stays under half of it. Read from the
    /// cgroups of the processes listening on --port (the node's where none can be read).
    /// A percentage (e.g. 10%), or `off`.
    #[arg(long, default_value = "10%", value_parser = parse_pressure)]
    pub max_live_pressure: Pressure,

    /// Compare what the mirrors answer with what live answered, not only status and timing:
    /// the status, --compare-header headers and the body (JSON field by field, other bodies by
    /// length and digest). Live responses are then captured whole on the connections compared
    /// (--compare-sample), which costs the live path more than response heads. HTTP/1.
    #[arg(long)]
    pub compare_bodies: bool,

    /// Percentage of connections whose contents are compared.
    #[arg(long, default_value_t = 100.0, value_parser = parse_percent, requires = "compare_bodies")]
    pub compare_sample: f64,

    /// Header compared (repeatable; default content-type).
    #[arg(long = "compare-header", requires = "compare_bodies")]
    pub compare_headers: Vec<String>,

    /// Bodies up to this size are compared field by field, larger ones by length and digest.
    #[arg(long, default_value = "256K", value_parser = crate::memory_budget::parse_size)]
    pub compare_max_body: u64,

    /// A field path never compared, with everything below it, e.g. '$.servedAt' or
    /// '$.items[*].id' (repeatable).
    #[arg(long = "ignore", requires = "compare_bodies")]
    pub ignore: Vec<String>,

    /// An array whose elements are matched by a key instead of by index: PATH=KEY, e.g.
    /// '$.books=id' (repeatable).
    #[arg(long = "array-key", value_parser = parse_array_key, requires = "compare_bodies")]
    pub array_keys: Vec<(String, String)>,

    /// The mirror that runs the live version (Diffy's secondary): what differs between it and
    /// live is noise, and a candidate's difference on a field counts only beyond it.
    #[arg(long, requires = "compare_bodies")]
    pub secondary: Option<String>,

    #[command(flatten)]
    pub series: SeriesArgs,

    /// Distinct endpoints tracked at most; the rest are reported as `other`.
    #[arg(long, default_value_t = 500)]
    pub max_endpoints: usize,

    /// Serve Prometheus metrics on /metrics and the comparison on /report at this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,

    /// Write the final counters and comparison on exit to this file, in the text format
    /// /metrics serves (for batch runs and CI, where nothing scrapes the agent).
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,

    /// Do not print the comparison table on exit.
    #[arg(long)]
    pub no_report: bool,

    /// Clone but never read the clones: measures the kernel side alone (benchmarks).
    #[arg(long, hide = true)]
    pub no_reader: bool,

    /// Log capture counters every N seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u64,
}

/// A `--mirror`: its name, if given, and its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorArg {
    pub name: Option<String>,
    pub url: String,
}

fn parse_mirror(s: &str) -> Result<MirrorArg, String> {
    // A name stands before the URL's scheme; an `=` in the URL's query is not one.
    let named = s
        .find('=')
        .filter(|&eq| s.find("://").is_none_or(|scheme| eq < scheme));
    let Some(eq) = named else {
        return Ok(MirrorArg {
            name: None,
            url: s.to_string(),
        });
    };
    let (name, url) = (&s[..eq], &s[eq + 1..]);
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(valid) {
        return Err(format!(
            "{name:?}: a mirror's name is letters, digits, '-', '_' or '.', as in cand=http://v5:8080"
        ));
    }
    Ok(MirrorArg {
        name: Some(name.to_string()),
        url: url.to_string(),
    })
}

/// Each mirror's version tag: its name, or `--mirror-label` for the one given without a name.
pub fn mirror_names(
    mirrors: &[MirrorArg],
    unnamed_label: &str,
    live_label: &str,
) -> Result<Vec<String>, String> {
    if mirrors.len() > crate::compare::MAX_MIRRORS {
        return Err(format!(
            "{} mirrors: at most {} per agent",
            mirrors.len(),
            crate::compare::MAX_MIRRORS
        ));
    }
    let unnamed = mirrors.iter().filter(|m| m.name.is_none()).count();
    if unnamed > 1 {
        return Err("several mirrors: give each a name, as in --mirror cand=http://v5:8080".into());
    }
    let mut names: Vec<String> = Vec::new();
    for m in mirrors {
        let name = m.name.clone().unwrap_or_else(|| unnamed_label.to_string());
        if name == live_label || names.contains(&name) {
            return Err(format!(
                "mirror name {name:?} is taken: give each mirror a name of its own"
            ));
        }
        names.push(name);
    }
    Ok(names)
}

fn parse_array_key(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once('=') {
        Some((path, key)) if path.starts_with('$') && !key.is_empty() => {
            Ok((path.to_string(), key.to_string()))
        }
        _ => Err(format!("{s:?}: give PATH=KEY, as in '$.books=id'")),
    }
}

pub fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err("a percentage from 0 to 100".into())
    }
}

fn parse_cores(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c > 0.0 && c.is_finite() => Ok(c),
        _ => Err(format!("{s:?}: give a number of cores above 0, e.g. 0.5")),
    }
}

/// `--max-live-pressure`: a share of time (0 to 1), or none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pressure(pub Option<f64>);

fn parse_pressure(s: &str) -> Result<Pressure, String> {
    if s == "off" {
        return Ok(Pressure(None));
    }
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(Pressure(Some(p / 100.0))),
        _ => Err(format!(
            "{s:?}: give a percentage of time above 0 and at most 100, e.g. 10%, or off"
        )),
    }
}

/// See `--response-capture`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResponseCapture {
    Heads,
    Full,
}

/// See `--delivery`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    Records,
    Clones,
}

/// A ring buffer's size in KiB: a power of two from a page (4 KiB) to 1 GiB.
fn parse_ring_kb(s: &str) -> Result<u32, String> {
    let kb: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !kb.is_power_of_two() || !(4..=1 << 20).contains(&kb) {
        return Err(format!(
            "{kb} KiB: a ring buffer's size is a power of two from 4 to 1048576 KiB"
        ));
    }
    Ok(kb)
}

/// Parses `K:V` for `--add-header`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected NAME:VALUE"))?;
    Ok((
        HeaderName::from_str(k.trim()).map_err(|e| format!("header name {k:?}: {e}"))?,
        HeaderValue::from_str(v.trim()).map_err(|e| format!("header value {v:?}: {e}"))?,
    ))
}

fn parse_query_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected NAME=VALUE")),
    }
}

mod report;
#[cfg(test)]
mod tests;

pub use report::{ReportArgs, ReportFormat};
