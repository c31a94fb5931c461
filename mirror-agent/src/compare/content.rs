//! What a response says, and where two responses differ: status, chosen headers, and the
//! body, JSON field by field (paths like `$.reviews[*].rating`) or, for other bodies and those
//! over the size cap, by length and digest.
//!
//! Paths fold array indices into `[*]` so that a field's difference rate is over requests, not
//! elements; an array's length is compared as `<path>.length`. Arrays listed in `array_keys`
//! are matched by an element key instead of by index. Time and memory are bounded by the
//! body cap, serde_json's nesting limit (128) and `MAX_NODES` per comparison.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::exchange::content::Content;

/// Nodes visited per comparison at most; the rest of a huge document is not compared
/// (`Differences::truncated`).
pub const MAX_NODES: usize = 100_000;
/// Distinct differing paths kept per comparison.
const MAX_PATHS: usize = 256;
/// Longest example value kept, in characters.
pub const MAX_EXAMPLE: usize = 80;

/// How responses are compared.
#[derive(Clone, Debug, Default)]
pub struct ContentConfig {
    /// Headers compared (lower case).
    pub headers: Vec<String>,
    /// Headers whose values are never shown (compared, and reported as differing only).
    pub redacted: Vec<String>,
    /// Arrays matched by an element key: (the array's path, as reported, and the key).
    pub array_keys: Vec<(String, String)>,
    /// Redacts the examples shown (`--redact-*`); the comparison itself sees the values.
    pub redactor: Option<crate::redact::Redactor>,
}

/// A difference at one path: the two values (cut to `MAX_EXAMPLE`), None where one side has
/// no such field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldDiff {
    pub live: Option<String>,
    pub mirror: Option<String>,
}

/// Where two responses differ, one entry per path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Differences {
    pub paths: BTreeMap<String, FieldDiff>,
    /// The documents were larger than `MAX_NODES`: the rest was not compared.
    pub truncated: bool,
    /// Bodies compared by digest only (over the cap, or not both JSON).
    pub by_digest: bool,
}

/// Compares a live response with a mirror's.
pub fn compare(live: &Content, mirror: &Content, cfg: &ContentConfig) -> Differences {
    let mut d = Differences::default();
    if live.code != mirror.code {
        d.add(cfg, "status", Some(&live.code), Some(&mirror.code));
    }
    for name in &cfg.headers {
        let (l, m) = (header(live, name), header(mirror, name));
        if l != m {
            let path = format!("header.{name}");
            if cfg.redacted.contains(name) {
                d.add(cfg, &path, l.map(|_| "<redacted>"), m.map(|_| "<redacted>"));
            } else {
                d.add(cfg, &path, l, m);
            }
        }
    }
    if live.body == mirror.body {
        // Byte for byte the same: nothing to parse.
        return d;
    }
    match (live.json(), mirror.json()) {
        (Some(l), Some(m)) => {
            let mut walk = Walk {
                cfg,
                out: &mut d,
                nodes: 0,
                path: String::from("$"),
            };
            walk.value(l, m);
        }
        _ => {
            d.by_digest = true;
            if live.body.len() != mirror.body.len() {
                d.add(
                    cfg,
                    "body.length",
                    Some(&live.body.len().to_string()),
                    Some(&mirror.body.len().to_string()),
                );
            } else {
                let (l, m) = (live.body.sha256(), mirror.body.sha256());
                if l != m {
                    d.add(cfg, "body.sha256", Some(&hex8(&l)), Some(&hex8(&m)));
                }
            }
        }
    }
    d
}

fn header<'a>(c: &'a Content, name: &str) -> Option<&'a str> {
    c.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The first 8 bytes of a digest in hex: enough to tell examples apart.
fn hex8(d: &[u8; 32]) -> String {
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Differences {
    /// Notes a difference at `path`. The examples are redacted (`cfg.redactor`) before they
    /// are cut, so that a cut never leaves half a secret that its pattern no longer finds.
    fn add(&mut self, cfg: &ContentConfig, path: &str, live: Option<&str>, mirror: Option<&str>) {
        if self.paths.contains_key(path) {
            return;
        }
        if self.paths.len() >= MAX_PATHS {
            self.truncated = true;
            return;
        }
        let cut = |s: &str| {
            let s = match &cfg.redactor {
                Some(r) => r.example(path, s),
                None => std::borrow::Cow::Borrowed(s),
            };
            let mut out: String = s.chars().take(MAX_EXAMPLE).collect();
            if out.len() < s.len() {
                out.push('…');
            }
            out
        };
        self.paths.insert(
            path.to_string(),
            FieldDiff {
                live: live.map(cut),
                mirror: mirror.map(cut),
            },
        );
    }
}

struct Walk<'a> {
    cfg: &'a ContentConfig,
    out: &'a mut Differences,
    nodes: usize,
    /// The path of the value being compared; grown and cut back as the walk goes, so that
    /// a path is written out only where something differs.
    path: String,
}

impl Walk<'_> {
    fn value(&mut self, l: &Value, m: &Value) {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            self.out.truncated = true;
            return;
        }
        match (l, m) {
            (Value::Object(lo), Value::Object(mo)) => {
                let at = self.path.len();
                for (k, lv) in lo {
                    push_member(&mut self.path, k);
                    match mo.get(k) {
                        Some(mv) => self.value(lv, mv),
                        None => self.out.add(self.cfg, &self.path, Some(&show(lv)), None),
                    }
                    self.path.truncate(at);
                }
                for (k, mv) in mo {
                    if !lo.contains_key(k) {
                        push_member(&mut self.path, k);
                        self.out.add(self.cfg, &self.path, None, Some(&show(mv)));
                        self.path.truncate(at);
                    }
                }
            }
            (Value::Array(la), Value::Array(ma)) => {
                let at = self.path.len();
                let key = self
                    .cfg
                    .array_keys
                    .iter()
                    .find(|(p, _)| *p == self.path)
                    .map(|(_, k)| k.as_str());
                if key.is_none() && la.len() != ma.len() {
                    self.path.push_str(".length");
                    self.out.add(
                        self.cfg,
                        &self.path,
                        Some(&la.len().to_string()),
                        Some(&ma.len().to_string()),
                    );
                    self.path.truncate(at);
                }
                self.path.push_str("[*]");
                match key {
                    Some(key) => self.keyed(key, la, ma),
                    None => {
                        for (lv, mv) in la.iter().zip(ma) {
                            self.value(lv, mv);
                        }
                    }
                }
                self.path.truncate(at);
            }
            (Value::Number(a), Value::Number(b)) => {
                if !same_number(a, b) {
                    self.out.add(
                        self.cfg,
                        &self.path,
                        Some(&a.to_string()),
                        Some(&b.to_string()),
                    );
                }
            }
            _ if l == m => {}
            _ => self
                .out
                .add(self.cfg, &self.path, Some(&show(l)), Some(&show(m))),
        }
    }

    /// Elements matched by their `key` field; those on one side only are missing or extra.
    fn keyed(&mut self, key: &str, la: &[Value], ma: &[Value]) {
        let key_of = |v: &Value| v.get(key).map(show);
        let mirror: BTreeMap<String, &Value> =
            ma.iter().filter_map(|v| Some((key_of(v)?, v))).collect();
        let mut seen = std::collections::BTreeSet::new();
        for lv in la {
            let Some(k) = key_of(lv) else { continue };
            match mirror.get(&k) {
                Some(mv) => self.value(lv, mv),
                None => self.out.add(self.cfg, &self.path, Some(&show(lv)), None),
            }
            seen.insert(k);
        }
        for (k, mv) in &mirror {
            if !seen.contains(k) {
                self.out.add(self.cfg, &self.path, None, Some(&show(mv)));
            }
        }
    }
}

/// Appends a member to a path: `.name`, or `["odd name"]` where the name is not a plain
/// identifier.
fn push_member(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&Value::String(key.to_string()).to_string());
        path.push(']');
    }
}

/// A value as an example: JSON text, cut later.
fn show(v: &Value) -> String {
    match v {
        Value::Object(_) | Value::Array(_) => {
            let mut s = v.to_string();
            s.truncate(MAX_EXAMPLE * 4);
            s
        }
        _ => v.to_string(),
    }
}

/// 4 and 4.0 are the same number; 4.5 and 4 are not. Integers are compared exactly.
fn same_number(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x == y;
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::content::{Body, BodyCollector};
    use bytes::Bytes;
    use proptest::prelude::*;

    fn content(body: &str) -> Content {
        Content::new(
            "200".into(),
            Vec::new(),
            Body::Whole(Bytes::from(body.to_string())),
        )
    }

    fn paths(live: &str, mirror: &str, cfg: &ContentConfig) -> Vec<(String, FieldDiff)> {
        compare(&content(live), &content(mirror), cfg)
            .paths
            .into_iter()
            .collect()
    }

    fn fd(l: Option<&str>, m: Option<&str>) -> FieldDiff {
        FieldDiff {
            live: l.map(String::from),
            mirror: m.map(String::from),
        }
    }

    #[test]
    fn nested_objects_arrays_types_missing_and_extra_fields() {
        let live = r#"{"id":2,"title":"Dune","price":9.5,"rating":4.5,"tags":["a","b"],
            "author":{"name":"Herbert","born":1920},"reviews":[{"rating":5},{"rating":4}]}"#;
        let cand = r#"{"id":2,"title":"Dune","cost":9.5,"rating":4,"tags":["a","b","c"],
            "author":{"name":"Herbert","born":"1920"},"reviews":[{"rating":5},{"rating":3}]}"#;
        let got = paths(live, cand, &ContentConfig::default());
        let want = vec![
            (
                "$.author.born".to_string(),
                fd(Some("1920"), Some("\"1920\"")),
            ),
            ("$.cost".to_string(), fd(None, Some("9.5"))),
            ("$.price".to_string(), fd(Some("9.5"), None)),
            ("$.rating".to_string(), fd(Some("4.5"), Some("4"))),
            ("$.reviews[*].rating".to_string(), fd(Some("4"), Some("3"))),
            ("$.tags.length".to_string(), fd(Some("2"), Some("3"))),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(paths(r#"{"a":4}"#, r#"{"a":4.0}"#, &ContentConfig::default()).is_empty());
        assert!(paths(r#"{"a":1e2}"#, r#"{"a":100}"#, &ContentConfig::default()).is_empty());
        assert_eq!(
            paths(r#"{"a":4.5}"#, r#"{"a":4}"#, &ContentConfig::default()).len(),
            1
        );
        assert_eq!(
            paths(
                r#"{"a":9007199254740993}"#,
                r#"{"a":9007199254740992}"#,
                &ContentConfig::default()
            )
            .len(),
            1,
            "large integers exactly"
        );
    }

    #[test]
    fn keyed_arrays_match_elements_by_key() {
        let live = r#"{"books":[{"id":1,"t":"a"},{"id":2,"t":"b"}]}"#;
        let cand = r#"{"books":[{"id":2,"t":"b"},{"id":1,"t":"A"},{"id":3,"t":"c"}]}"#;
        let by_index = paths(live, cand, &ContentConfig::default());
        assert!(by_index.iter().any(|(p, _)| p == "$.books[*].id"));
        let cfg = ContentConfig {
            array_keys: vec![("$.books".into(), "id".into())],
            ..Default::default()
        };
        let got = paths(live, cand, &cfg);
        assert_eq!(
            got.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            ["$.books[*]", "$.books[*].t"],
            "{got:?}"
        );
        assert_eq!(got[1].1, fd(Some("\"a\""), Some("\"A\"")));
        assert_eq!(got[0].1.live, None, "an extra element");
    }

    #[test]
    fn status_headers_and_other_bodies() {
        let mut l = content("plain text");
        let mut m = content("plain text!");
        l.headers = vec![
            ("content-type".into(), "text/plain".into()),
            ("set-cookie".into(), "s=1".into()),
        ];
        m.headers = vec![("set-cookie".into(), "s=2".into())];
        m.code = "500".into();
        let cfg = ContentConfig {
            headers: vec!["content-type".into(), "set-cookie".into()],
            redacted: vec!["set-cookie".into()],
            ..Default::default()
        };
        let d = compare(&l, &m, &cfg);
        assert!(d.by_digest);
        let got: Vec<_> = d.paths.into_iter().collect();
        assert_eq!(
            got,
            [
                ("body.length".to_string(), fd(Some("10"), Some("11"))),
                (
                    "header.content-type".to_string(),
                    fd(Some("text/plain"), None)
                ),
                (
                    "header.set-cookie".to_string(),
                    fd(Some("<redacted>"), Some("<redacted>"))
                ),
                ("status".to_string(), fd(Some("200"), Some("500"))),
            ]
        );
        let same_len = compare(&content("abc"), &content("abd"), &cfg);
        assert!(same_len.paths.contains_key("body.sha256"));
    }

    #[test]
    fn invalid_json_and_digests_over_the_cap() {
        let d = compare(
            &content("{not json"),
            &content("{not jsoN"),
            &ContentConfig::default(),
        );
        assert!(d.by_digest);
        assert_eq!(d.paths.keys().collect::<Vec<_>>(), ["body.sha256"]);
        let big = "x".repeat(1000);
        let a = Content::new(
            "200".into(),
            Vec::new(),
            Body::new(Bytes::from(big.clone()), 100),
        );
        let mut c = BodyCollector::new(100);
        for chunk in big.as_bytes().chunks(7) {
            c.push(chunk);
        }
        let b = Content::new("200".into(), Vec::new(), c.finish());
        assert!(matches!(a.body, Body::Digest { len: 1000, .. }));
        assert_eq!(a, b, "a body digested as it came equals one digested whole");
        assert!(compare(&a, &b, &ContentConfig::default()).paths.is_empty());
    }

    #[test]
    fn huge_and_deep_documents_in_bounded_time() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        // A byte apart, so that both are parsed.
        let d = compare(
            &content(&deep),
            &content(&format!("{deep} ")),
            &ContentConfig::default(),
        );
        assert!(
            d.by_digest,
            "beyond serde_json's nesting limit: compared by digest"
        );
        let wide = format!(
            "[{}]",
            (0..300_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let t = std::time::Instant::now();
        let d = compare(
            &content(&wide),
            &content(&format!("{wide} ")),
            &ContentConfig::default(),
        );
        assert!(d.truncated && d.paths.is_empty());
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        let many_keys = format!(
            "{{{}}}",
            (0..1000)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let d = compare(
            &content(&many_keys),
            &content("{}"),
            &ContentConfig::default(),
        );
        assert_eq!(
            d.paths.len(),
            MAX_PATHS,
            "paths kept per comparison are capped"
        );
        assert!(d.truncated);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]{1,2}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn a_document_equals_itself_and_differences_are_symmetric(
            a in arb_json(),
            b in arb_json(),
        ) {
            let wrap = |v: &Value| content(&serde_json::json!({ "v": v }).to_string());
            let cfg = ContentConfig::default();
            prop_assert!(compare(&wrap(&a), &wrap(&a), &cfg).paths.is_empty());
            let ab = compare(&wrap(&a), &wrap(&b), &cfg);
            let ba = compare(&wrap(&b), &wrap(&a), &cfg);
            let ab_paths: Vec<_> = ab.paths.keys().collect();
            let ba_paths: Vec<_> = ba.paths.keys().collect();
            prop_assert_eq!(ab_paths, ba_paths);
            prop_assert_eq!(ab.paths.is_empty(), a == b || same_numbers(&a, &b));
        }
    }

    /// Equal but for numbers written differently (4 and 4.0).
    fn same_numbers(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => same_number(x, y),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_numbers(p, q))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_numbers(v, w)))
            }
            _ => a == b,
        }
    }
}
