//! The TrafficMirror resource: one mirroring, declared. The same objects come from the
//! Kubernetes API (`--traffic-mirrors`) or from a YAML file (`--config`), and are checked here
//! into a `Mirroring` the agent can run. The OpenAPI schema the API server checks at admission is
//! generated from these types (`deploy/trafficmirror-crd.yaml`, kept equal by a test); what a
//! schema cannot say (regexes that compile, header names, unique candidates) is checked here and
//! reported in the object's status.

use std::collections::BTreeMap;
use std::str::FromStr;

use hyper::header::{HeaderName, HeaderValue};
use kube::CustomResource;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::redact::{Pattern, RedactRules};
use crate::replay::rewrite::TargetRewrite;
use crate::replay::secrets::SecretSpec;
use crate::replay::writes::{WriteAction, WritePolicy, WriteRoute};
use crate::replay::HostMode;

/// One mirroring: which live pods and ports, which candidates get a copy of their requests,
/// which requests, and how answers are compared.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "mirror-agent.dev",
    version = "v1alpha1",
    kind = "TrafficMirror",
    namespaced,
    status = "TrafficMirrorStatus",
    shortname = "tm",
    doc = "Mirrors the requests of the selected pods to candidate versions and compares their answers",
    printcolumn = r#"{"name": "Ports", "type": "string", "jsonPath": ".spec.ports"}"#,
    printcolumn = r#"{"name": "Nodes", "type": "string", "jsonPath": ".status.nodes[*].node"}"#,
    printcolumn = r#"{"name": "Pods", "type": "string", "jsonPath": ".status.nodes[*].pods"}"#,
    printcolumn = r#"{"name": "Mirrored", "type": "string", "jsonPath": ".status.nodes[*].mirrored"}"#,
    printcolumn = r#"{"name": "Verdict", "type": "string", "jsonPath": ".status.nodes[*].verdict"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMirrorSpec {
    /// The live pods, in the object's namespace. None or empty: every pod of the namespace (in
    /// a `--config` file without Kubernetes: whatever the agent is attached to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// The live service's ports.
    #[schemars(length(min = 1, max = 16), inner(range(min = 1)))]
    pub ports: Vec<u16>,
    #[schemars(length(min = 1, max = 8))]
    pub candidates: Vec<Candidate>,
    /// Which requests are mirrored; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestMatch>,
    /// Which writes (requests with unsafe methods) reach which candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<Writes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareSpec>,
    /// Record its requests and live responses (the agent's `--record-mirrorings` directory,
    /// under NAMESPACE/NAME), redacted first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecordSpec {
    /// Values masked as `REDACTED-<keyed hash>` before anything is written (needs the
    /// agent's `--redact-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<RedactSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedactSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<String>,
    /// JSON paths such as `$.customer.email` or `$.items[*].card`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json_paths: Vec<String>,
    /// `email`, `card` (Luhn-checked), `token`, or a regular expression.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A version that gets a copy of the live requests.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// Its version tag in the table and the metrics (e.g. `V3MIR-BookServiceDelay`).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub name: String,
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// Connections mirrored to it, in percent (whole connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sample_percent: Option<f64>,
    /// Runs the live version: its differences from live are noise, cancelled in content diffs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secondary: bool,
    /// `keep` (the client's), `mirror` (the URL's authority, the default) or `shadow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(keep|mirror|shadow)$"))]
    pub host: Option<String>,
    /// Headers set on every request sent to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set_headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_headers: Vec<String>,
    /// `NAME: [PREFIX]@FILE`: a header read from a file (a mounted Secret), re-read as it
    /// changes; the client's copy never reaches the candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_headers: Vec<String>,
    /// Requests per second sent at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rps: Option<f64>,
    /// The target as it gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// The first match in the path replaced (`$1` for a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// Query parameters set, replacing the client's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set_query: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_query: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathRewrite {
    pub regex: String,
    pub replacement: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// Only these methods; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Only paths that match this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only requests whose header fields match these regular expressions, by name (a request
    /// without the field does not match).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Writes {
    /// `mirror` (the default), `skip`, or `only:NAME[+NAME]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// `REGEX=ACTION`, the first that matches a path decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompareSpec {
    /// The live rows' version tag (default `live`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_label: Option<String>,
    /// Compare bodies too (needs the agent's `--compare-bodies`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bodies: bool,
    /// Content paths never compared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
    /// Arrays whose elements are matched by a key field rather than by index, by path:
    /// `{"$.books": id}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub array_keys: BTreeMap<String, String>,
}

/// What each node's agent reports, one entry per node (merged by the API server: each agent
/// applies only its own entry, as its own field manager).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMirrorStatus {
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    /// The spec's generation this entry describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// Pods mirrored on this node now.
    pub pods: u64,
    /// Requests sent to candidates.
    pub mirrored: u64,
    /// Requests not mirrored, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<String, u64>,
    /// The verdicts, one line.
    #[serde(default)]
    pub verdict: String,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// Why a declared mirroring cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("two candidates are named {0}: names are version tags and must differ")]
    DuplicateCandidate(String),
    #[error("{file}: {detail}")]
    File { file: String, detail: String },
}

impl SpecError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::Invalid { .. } | SpecError::DuplicateCandidate(_) => "InvalidSpec",
            SpecError::File { .. } => "InvalidFile",
        }
    }
}

fn invalid(what: impl Into<String>, detail: impl ToString) -> SpecError {
    SpecError::Invalid {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// A candidate, checked: what its replay stage needs beyond the agent's defaults.
#[derive(Clone, Debug)]
pub struct CandidatePlan {
    pub name: String,
    pub url: hyper::Uri,
    /// Parts per million of connections.
    pub sample_ppm: u32,
    pub secondary: bool,
    pub host: HostMode,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    pub secret_headers: Vec<SecretSpec>,
    pub max_rps: Option<f64>,
    pub rewrite: TargetRewrite,
}

/// A mirroring, checked: everything parsed, nothing resolved or started yet.
#[derive(Clone, Debug)]
pub struct Mirroring {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    /// A label selector for the API (`k=v,k2=v2`); empty: every pod of the namespace.
    pub labels: String,
    pub ports: Vec<u16>,
    pub candidates: Vec<CandidatePlan>,
    pub methods: Vec<String>,
    pub path: Option<Regex>,
    pub headers: Vec<(HeaderName, Regex)>,
    pub writes: WritePolicy,
    pub live_label: String,
    pub bodies: bool,
    pub ignore: Vec<String>,
    pub array_keys: Vec<(String, String)>,
    /// Recorded, with these redaction rules (maybe none).
    pub record: Option<RedactRules>,
}

impl Mirroring {
    /// Checks a spec; the error names the field and what is wrong with it.
    pub fn check(key: &str, spec: &TrafficMirrorSpec) -> Result<Mirroring, SpecError> {
        if spec.ports.is_empty() || spec.ports.contains(&0) {
            return Err(invalid(
                "spec.ports",
                "give the live service's ports, 1-65535",
            ));
        }
        if spec.candidates.is_empty() {
            return Err(invalid("spec.candidates", "give at least one candidate"));
        }
        let mut candidates = Vec::new();
        for (i, c) in spec.candidates.iter().enumerate() {
            if candidates.iter().any(|p: &CandidatePlan| p.name == c.name) {
                return Err(SpecError::DuplicateCandidate(c.name.clone()));
            }
            candidates.push(candidate(&format!("spec.candidates[{i}]"), c)?);
        }
        let requests = spec.requests.clone().unwrap_or_default();
        let methods = requests
            .methods
            .iter()
            .map(|m| m.trim().to_ascii_uppercase())
            .collect::<Vec<_>>();
        if let Some(m) = methods.iter().find(|m| !is_token(m)) {
            return Err(invalid(
                "spec.requests.methods",
                format!("{m:?} is not a method"),
            ));
        }
        let path = requests
            .path
            .as_deref()
            .map(Regex::new)
            .transpose()
            .map_err(|e| invalid("spec.requests.path", e))?;
        let mut headers = Vec::new();
        for (name, re) in &requests.headers {
            let what = format!("spec.requests.headers.{name}");
            let name = HeaderName::from_str(name).map_err(|e| invalid(&what, e))?;
            headers.push((name, Regex::new(re).map_err(|e| invalid(&what, e))?));
        }
        let writes = write_policy(spec.writes.as_ref())?;
        let names: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
        writes
            .check(&names)
            .map_err(|e| invalid("spec.writes", e))?;
        let compare = spec.compare.clone().unwrap_or_default();
        if let Some((path, key)) = compare
            .array_keys
            .iter()
            .find(|(p, k)| !p.starts_with('$') || k.is_empty())
        {
            return Err(invalid(
                "spec.compare.arrayKeys",
                format!(
                    "{path:?}: {key:?}: give a path from $ and a key field, as {{\"$.books\": id}}"
                ),
            ));
        }
        let (namespace, _) = key.split_once('/').unwrap_or(("default", key));
        Ok(Mirroring {
            key: key.to_string(),
            namespace: namespace.to_string(),
            labels: labels(spec.selector.as_ref()),
            ports: spec.ports.clone(),
            candidates,
            methods,
            path,
            headers,
            writes,
            live_label: compare.live_label.unwrap_or_else(|| "live".into()),
            bodies: compare.bodies,
            ignore: compare.ignore,
            array_keys: compare.array_keys.into_iter().collect(),
            record: spec.record.as_ref().map(redact_rules).transpose()?,
        })
    }

    /// Whether it selects pods (and needs the Kubernetes API to find them).
    pub fn selects_pods(&self) -> bool {
        !self.labels.is_empty()
    }
}

fn candidate(at: &str, c: &Candidate) -> Result<CandidatePlan, SpecError> {
    let field = |f: &str| format!("{at}.{f}");
    if c.name.is_empty()
        || !c
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            field("name"),
            "use letters, digits, '-', '_' and '.'",
        ));
    }
    let url = crate::replay::parse_mirror_url(&c.url).map_err(|e| invalid(field("url"), e))?;
    let percent = c.sample_percent.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&percent) {
        return Err(invalid(field("samplePercent"), "give 0 to 100"));
    }
    let host = match c.host.as_deref().unwrap_or("mirror") {
        "keep" => HostMode::Keep,
        "mirror" => HostMode::Mirror,
        "shadow" => HostMode::Shadow,
        other => {
            return Err(invalid(
                field("host"),
                format!("{other:?}: give keep, mirror or shadow"),
            ))
        }
    };
    let mut set_headers = Vec::new();
    for (k, v) in &c.set_headers {
        let name = HeaderName::from_str(k).map_err(|e| invalid(field("setHeaders"), e))?;
        let value = HeaderValue::from_str(v).map_err(|e| invalid(field("setHeaders"), e))?;
        set_headers.push((name, value));
    }
    let remove_headers = c
        .remove_headers
        .iter()
        .map(|h| HeaderName::from_str(h).map_err(|e| invalid(field("removeHeaders"), e)))
        .collect::<Result<_, _>>()?;
    let secret_headers = c
        .secret_headers
        .iter()
        .map(|s| SecretSpec::from_str(s).map_err(|e| invalid(field("secretHeaders"), e)))
        .collect::<Result<_, _>>()?;
    if c.max_rps.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err(invalid(field("maxRps"), "give a rate above 0"));
    }
    let rewrite = c.rewrite.clone().unwrap_or_default();
    let path = rewrite
        .path
        .map(|p| Regex::new(&p.regex).map(|re| (re, p.replacement)))
        .transpose()
        .map_err(|e| invalid(field("rewrite.path.regex"), e))?;
    Ok(CandidatePlan {
        rewrite: TargetRewrite {
            path,
            set_query: rewrite.set_query.into_iter().collect(),
            drop_query: rewrite.remove_query,
        },
        name: c.name.clone(),
        url,
        sample_ppm: (percent * 10_000.0).round() as u32,
        secondary: c.secondary,
        host,
        set_headers,
        remove_headers,
        secret_headers,
        max_rps: c.max_rps,
    })
}

fn redact_rules(r: &RecordSpec) -> Result<RedactRules, SpecError> {
    let r = r.redact.clone().unwrap_or_default();
    let patterns = r
        .patterns
        .iter()
        .map(|p| Pattern::parse(p).map_err(|e| invalid("spec.record.redact.patterns", e)))
        .collect::<Result<_, _>>()?;
    Ok(RedactRules {
        headers: r.headers,
        query: r.query,
        json_paths: r.json_paths,
        patterns,
    })
}

fn write_policy(w: Option<&Writes>) -> Result<WritePolicy, SpecError> {
    let Some(w) = w else {
        return Ok(WritePolicy::default());
    };
    let default = match &w.default {
        Some(d) => WriteAction::from_str(d).map_err(|e| invalid("spec.writes.default", e))?,
        None => WriteAction::default(),
    };
    let routes = w
        .routes
        .iter()
        .map(|r| WriteRoute::from_str(r).map_err(|e| invalid("spec.writes.routes", e)))
        .collect::<Result<_, _>>()?;
    Ok(WritePolicy { default, routes })
}

fn labels(sel: Option<&Selector>) -> String {
    sel.map(|s| {
        s.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    })
    .unwrap_or_default()
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic())
}

/// The key of an object: `namespace/name`.
pub fn key_of(tm: &TrafficMirror) -> String {
    format!(
        "{}/{}",
        tm.metadata.namespace.as_deref().unwrap_or("default"),
        tm.metadata.name.as_deref().unwrap_or("")
    )
}

/// The TrafficMirrors of a YAML file (documents separated by `---`), by key. Documents of other
/// kinds are refused: the file is the agent's alone.
pub fn from_yaml(file: &str, text: &str) -> Result<BTreeMap<String, TrafficMirror>, SpecError> {
    let err = |detail: String| SpecError::File {
        file: file.to_string(),
        detail,
    };
    let mut out = BTreeMap::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "TrafficMirror" {
            return Err(err(format!(
                "document {} is a {kind:?}, not a TrafficMirror (apiVersion mirror-agent.dev/v1alpha1)",
                i + 1
            )));
        }
        // Read again from text: serde_yaml's errors then name the field's path.
        let text = serde_yaml::to_string(&value).map_err(|e| err(e.to_string()))?;
        let tm: TrafficMirror =
            serde_yaml::from_str(&text).map_err(|e| err(format!("document {}: {e}", i + 1)))?;
        if tm.metadata.name.as_deref().unwrap_or("").is_empty() {
            return Err(err(format!("document {} has no metadata.name", i + 1)));
        }
        let key = key_of(&tm);
        if out.insert(key.clone(), tm).is_some() {
            return Err(err(format!("{key} is declared twice")));
        }
    }
    Ok(out)
}

/// The CRD, as `deploy/trafficmirror-crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&TrafficMirror::crd()).expect("a CRD serializes")
}

#[cfg(test)]
mod tests;
