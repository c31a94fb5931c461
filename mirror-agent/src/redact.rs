//! Redaction: values that must not be kept (tokens, personal data) replaced by
//! `REDACTED-<keyed hash prefix>` before anything is written or shown. The hash is an HMAC
//! with a key of the operator's (a file, e.g. a mounted Secret): equal values stay equal, so
//! diffs and noise detection still work, but a value cannot be recovered, nor guessed by
//! hashing a dictionary without the key.
//!
//! Rules name header fields, query parameters and JSON paths (as the content comparison names
//! them, `$.card.number`, `$.items[*].email`), and patterns found anywhere in text: e-mail
//! addresses, card numbers (those passing the Luhn check), tokens (JWTs, common API-key
//! shapes), and regexes of the operator's.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use regex::Regex;
use serde_json::Value;
use sha2::Sha256;

/// Hex digits of the HMAC kept: 48 bits, enough that distinct values do not collide in a
/// diff, too few to serve as a fingerprint outside it.
const KEPT_HEX: usize = 12;
/// Shortest key accepted.
const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error(
        "--redact-key {}: {error}. Fix: create one, e.g. head -c 32 /dev/urandom > {}",
        path.display(),
        path.display()
    )]
    Key {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "--redact-key {}: shorter than {MIN_KEY_BYTES} bytes. Fix: head -c 32 /dev/urandom > {}",
        .0.display(),
        .0.display()
    )]
    ShortKey(PathBuf),
    #[error(
        "redaction rules need --redact-key FILE (the HMAC key), so that values cannot be guessed"
    )]
    NoKey,
    #[error("--redact-pattern {0:?}: {1}. Fix: email, card, token, or a regex")]
    Pattern(String, regex::Error),
}

/// A pattern searched for in text.
#[derive(Clone, Debug)]
pub enum Pattern {
    Email,
    /// 13 to 19 digits, spaces or dashes between, that pass the Luhn check.
    Card,
    /// JWTs and common API-key shapes (`sk_live_…`, `ghp_…`, `xoxb-…`, `AKIA…`).
    Token,
    Custom(Regex),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, RedactError> {
        Ok(match s {
            "email" => Pattern::Email,
            "card" => Pattern::Card,
            "token" => Pattern::Token,
            re => {
                Pattern::Custom(Regex::new(re).map_err(|e| RedactError::Pattern(s.to_string(), e))?)
            }
        })
    }

    fn regex(&self) -> Regex {
        let re = match self {
            Pattern::Email => r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            Pattern::Card => r"\b\d(?:[ -]?\d){12,18}\b",
            Pattern::Token => {
                r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b|\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bxox[abpr]-[A-Za-z0-9-]{10,}\b|\bAKIA[0-9A-Z]{16}\b"
            }
            Pattern::Custom(re) => return re.clone(),
        };
        Regex::new(re).expect("built-in patterns compile")
    }
}

/// What is redacted.
#[derive(Clone, Debug, Default)]
pub struct RedactRules {
    /// Header field names, lower case.
    pub headers: Vec<String>,
    pub query: Vec<String>,
    pub json_paths: Vec<String>,
    pub patterns: Vec<Pattern>,
}

impl RedactRules {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.query.is_empty()
            && self.json_paths.is_empty()
            && self.patterns.is_empty()
    }
}

/// Redacts with one key and one set of rules.
#[derive(Clone, Debug)]
pub struct Redactor {
    key: Vec<u8>,
    rules: RedactRules,
    /// The patterns, compiled, each with whether its matches must pass the Luhn check.
    found: Vec<(Regex, bool)>,
}

/// The HMAC key in `path`: at least 16 bytes.
pub fn read_key(path: &Path) -> Result<Vec<u8>, RedactError> {
    let key = std::fs::read(path).map_err(|error| RedactError::Key {
        path: path.to_path_buf(),
        error,
    })?;
    if key.len() < MIN_KEY_BYTES {
        return Err(RedactError::ShortKey(path.to_path_buf()));
    }
    Ok(key)
}

impl Redactor {
    /// None without rules; with rules, the key file must exist and hold 16 bytes or more.
    pub fn from_key_file(
        key: Option<&Path>,
        rules: RedactRules,
    ) -> Result<Option<Redactor>, RedactError> {
        if rules.is_empty() {
            return Ok(None);
        }
        let key = read_key(key.ok_or(RedactError::NoKey)?)?;
        Ok(Some(Redactor::new(key, rules)))
    }

    pub fn new(key: Vec<u8>, mut rules: RedactRules) -> Redactor {
        for h in &mut rules.headers {
            h.make_ascii_lowercase();
        }
        let found = rules
            .patterns
            .iter()
            .map(|p| (p.regex(), matches!(p, Pattern::Card)))
            .collect();
        Redactor { key, rules, found }
    }

    /// What the agent logs at start.
    pub fn describe(&self) -> String {
        let r = &self.rules;
        format!(
            "redacting before anything is kept or shown: headers {:?}, query parameters {:?}, \
             JSON paths {:?}, {} patterns",
            r.headers,
            r.query,
            r.json_paths,
            r.patterns.len()
        )
    }

    /// `REDACTED-` and the first hex digits of the value's HMAC.
    pub fn mask(&self, value: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any size");
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut out = String::from("REDACTED-");
        for b in &digest[..KEPT_HEX / 2] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// `text` with every pattern's matches masked.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (re, luhn) in &self.found {
            if !re.is_match(&out) {
                continue;
            }
            let replaced = re
                .replace_all(&out, |c: &regex::Captures| {
                    let m = &c[0];
                    if *luhn && !luhn_valid(m) {
                        m.to_string()
                    } else {
                        self.mask(m.as_bytes())
                    }
                })
                .into_owned();
            out = Cow::Owned(replaced);
        }
        out
    }

    /// A header field's value as kept: masked whole when the field is named by a rule,
    /// otherwise with the patterns masked.
    pub fn header<'a>(&self, name: &str, value: &'a str) -> Cow<'a, str> {
        if self
            .rules
            .headers
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            Cow::Owned(self.mask(value.as_bytes()))
        } else {
            self.text(value)
        }
    }

    /// A request target with the named query parameters' values masked, and the patterns.
    pub fn target<'a>(&self, target: &'a str) -> Cow<'a, str> {
        let Some((path, query)) = target.split_once('?') else {
            return self.text(target);
        };
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if self.rules.query.iter().any(|q| q == k) => {
                    format!("{k}={}", self.mask(v.as_bytes()))
                }
                _ => self.text(pair).into_owned(),
            })
            .collect();
        let redacted = format!("{}?{}", self.text(path), params.join("&"));
        if redacted == target {
            Cow::Borrowed(target)
        } else {
            Cow::Owned(redacted)
        }
    }

    /// A JSON document with the named paths' values masked (each whole, whatever its type)
    /// and the patterns masked in every string and key: whether anything was.
    pub fn json(&self, v: &mut Value) -> bool {
        let mut path = String::from("$");
        self.walk(v, &mut path)
    }

    fn walk(&self, v: &mut Value, path: &mut String) -> bool {
        if self.rules.json_paths.iter().any(|p| p == path) {
            let text = v.to_string();
            *v = Value::String(self.mask(text.as_bytes()));
            return true;
        }
        let len = path.len();
        let mut changed = false;
        match v {
            Value::String(s) => {
                if let Cow::Owned(r) = self.text(s) {
                    *s = r;
                    changed = true;
                }
            }
            Value::Array(items) => {
                path.push_str("[*]");
                for item in items {
                    changed |= self.walk(item, path);
                }
            }
            Value::Object(fields) => {
                let old = std::mem::take(fields);
                for (k, mut item) in old {
                    path.push('.');
                    path.push_str(&k);
                    changed |= self.walk(&mut item, path);
                    path.truncate(len);
                    let key = self.text(&k);
                    changed |= matches!(key, Cow::Owned(_));
                    fields.insert(key.into_owned(), item);
                }
            }
            _ => {}
        }
        path.truncate(len);
        changed
    }

    /// An example value shown in a content diff at `path` (`$.a.b`, `header.name`): masked
    /// whole at or below a redacted JSON path or header, otherwise with the patterns masked.
    pub fn example<'a>(&self, path: &str, value: &'a str) -> Cow<'a, str> {
        let below = |p: &str| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        let header = path
            .strip_prefix("header.")
            .is_some_and(|h| self.rules.headers.iter().any(|r| r.eq_ignore_ascii_case(h)));
        if header || self.rules.json_paths.iter().any(|p| below(p)) {
            Cow::Owned(self.mask(value.as_bytes()))
        } else {
            self.text(value)
        }
    }

    /// A body as kept: JSON redacted field by field (then written compactly), other UTF-8
    /// text with the patterns masked; None when nothing changes (binary bodies are kept as
    /// they are: patterns in them cannot be told from data).
    pub fn body(&self, body: &[u8]) -> Option<Vec<u8>> {
        if let Ok(mut v) = serde_json::from_slice::<Value>(body) {
            return self.json(&mut v).then(|| v.to_string().into_bytes());
        }
        let text = std::str::from_utf8(body).ok()?;
        match self.text(text) {
            Cow::Owned(r) => Some(r.into_bytes()),
            Cow::Borrowed(_) => None,
        }
    }
}

/// The Luhn check over the digits of `s` (separators ignored).
fn luhn_valid(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        Redactor::new(
            b"0123456789abcdef-test-key".to_vec(),
            RedactRules {
                headers: vec!["X-Api-Key".into()],
                query: vec!["ssn".into()],
                json_paths: vec!["$.card".into(), "$.items[*].owner".into()],
                patterns: ["email", "card", "token"]
                    .iter()
                    .map(|p| Pattern::parse(p).unwrap())
                    .collect(),
            },
        )
    }

    #[test]
    fn equal_values_mask_equally_and_other_keys_differently() {
        let r = redactor();
        let a = r.mask(b"alice@example.com");
        assert_eq!(a, r.mask(b"alice@example.com"));
        assert_ne!(a, r.mask(b"bob@example.com"));
        assert!(a.starts_with("REDACTED-") && a.len() == "REDACTED-".len() + KEPT_HEX);
        let other = Redactor::new(b"another-key-of-16+".to_vec(), RedactRules::default());
        assert_ne!(a, other.mask(b"alice@example.com"));
    }

    #[test]
    fn patterns_find_emails_cards_that_pass_luhn_and_tokens() {
        let r = redactor();
        let text = "mail alice@example.com, card 4111 1111 1111 1111, order 4111111111111112, \
                    jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N, \
                    key sk_live_abcdefghijklmnop1234";
        let out = r.text(text);
        for secret in [
            "alice@example.com",
            "4111 1111 1111 1111",
            "eyJhbGciOiJIUzI1NiJ9",
            "sk_live_abcdefghijklmnop1234",
        ] {
            assert!(!out.contains(secret), "{secret} left in {out}");
        }
        // Fails the Luhn check: an order number, not a card.
        assert!(out.contains("4111111111111112"), "{out}");
        assert_eq!(r.text("nothing here"), Cow::Borrowed("nothing here"));
    }

    #[test]
    fn headers_queries_and_json_paths_are_masked_whole() {
        let r = redactor();
        assert_eq!(r.header("x-api-key", "k-123"), r.mask(b"k-123"));
        assert_eq!(r.header("accept", "text/html"), "text/html");
        let t = r.target("/users?ssn=123-45-6789&page=2&mail=bob@example.com");
        assert_eq!(
            t,
            format!(
                "/users?ssn={}&page=2&mail={}",
                r.mask(b"123-45-6789"),
                r.mask(b"bob@example.com")
            )
        );
        assert_eq!(r.target("/plain?page=2"), Cow::Borrowed("/plain?page=2"));
        let mut v: Value = serde_json::from_str(
            r#"{"card":{"number":"4111111111111111","cvc":123},"items":[{"owner":"Al","n":1}],
                "note":"ring alice@example.com"}"#,
        )
        .unwrap();
        r.json(&mut v);
        let card = r.mask(br#"{"cvc":123,"number":"4111111111111111"}"#);
        assert_eq!(v["card"], Value::String(card));
        assert_eq!(v["items"][0]["owner"], Value::String(r.mask(br#""Al""#)));
        assert_eq!(v["items"][0]["n"], 1);
        assert_eq!(
            v["note"],
            Value::String(format!("ring {}", r.mask(b"alice@example.com")))
        );
    }

    #[test]
    fn diff_examples_are_masked_at_and_below_redacted_paths() {
        let r = redactor();
        assert_eq!(r.example("$.card.number", "4"), r.mask(b"4"));
        assert_eq!(r.example("$.cards", "x"), "x");
        assert_eq!(r.example("header.x-api-key", "k"), r.mask(b"k"));
        assert_eq!(
            r.example("$.note", "to alice@example.com"),
            format!("to {}", r.mask(b"alice@example.com"))
        );
    }

    #[test]
    fn bodies_change_only_when_something_is_found() {
        let r = redactor();
        let out = r.body(br#"{"email":"alice@example.com"}"#).unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("alice"));
        assert!(r.body(br#"{"n":1}"#).is_none());
        assert!(r.body(b"a=1&to=bob@example.com").is_some());
        assert!(r.body(&[0xff, 0xfe, b'@']).is_none());
    }

    #[test]
    fn rules_without_a_usable_key_name_the_fix() {
        let rules = RedactRules {
            patterns: vec![Pattern::Email],
            ..RedactRules::default()
        };
        assert!(Redactor::from_key_file(None, RedactRules::default())
            .unwrap()
            .is_none());
        let e = Redactor::from_key_file(None, rules.clone()).unwrap_err();
        assert!(e.to_string().contains("--redact-key"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        let e = Redactor::from_key_file(Some(&key), rules.clone()).unwrap_err();
        assert!(e.to_string().contains("Fix: create one"), "{e}");
        std::fs::write(&key, b"short").unwrap();
        let e = Redactor::from_key_file(Some(&key), rules.clone()).unwrap_err();
        assert!(e.to_string().contains("shorter than 16 bytes"), "{e}");
        std::fs::write(&key, [7u8; 32]).unwrap();
        assert!(Redactor::from_key_file(Some(&key), rules)
            .unwrap()
            .is_some());
        let e = Pattern::parse("(").unwrap_err().to_string();
        assert!(e.contains("Fix:"), "{e}");
    }
}
