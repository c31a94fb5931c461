//! The write policy (`--writes`, `--writes-route`): whether requests that may change state on
//! the server are mirrored, per path and per mirror. A candidate that shares a database with
//! live would otherwise write twice (a payment, an order), so a platform team decides where
//! writes go; by default they are mirrored, as Envoy and nginx `mirror` do.
//!
//! A write is a request whose method is not safe (RFC 9110 9.2.1): not GET, HEAD, OPTIONS or
//! TRACE. gRPC calls are all POSTs: a route that names read-only methods lets them through.

use std::fmt;
use std::str::FromStr;

use regex::Regex;

/// What happens to writes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum WriteAction {
    /// Sent to every mirror.
    #[default]
    Mirror,
    /// Sent to none, and counted (`mirror_replay_filtered_write_policy`).
    Skip,
    /// Sent only to the mirrors with these names.
    Only(Vec<String>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WritePolicyError {
    #[error(
        "unknown write action {0:?}. Fix: use mirror, skip, or only:NAME (mirror names joined \
         with +, e.g. only:staging+canary)"
    )]
    Action(String),
    #[error("write route {0:?} has no action. Fix: give REGEX=ACTION, e.g. '^/payments=skip'")]
    Route(String),
    #[error("write route {route:?}: {error}. Fix: a regex over the path, e.g. '^/payments/'")]
    Regex { route: String, error: regex::Error },
    #[error(
        "{0}: no mirror has that name (mirrors: {1}). Fix: name mirrors with --mirror NAME=URL"
    )]
    UnknownMirror(String, String),
}

impl FromStr for WriteAction {
    type Err = WritePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "mirror" => Ok(WriteAction::Mirror),
            "skip" => Ok(WriteAction::Skip),
            other => {
                let names: Vec<String> = other
                    .strip_prefix("only:")
                    .ok_or_else(|| WritePolicyError::Action(s.to_string()))?
                    .split('+')
                    .map(|n| n.trim().to_string())
                    .collect();
                if names.iter().any(String::is_empty) {
                    return Err(WritePolicyError::Action(s.to_string()));
                }
                Ok(WriteAction::Only(names))
            }
        }
    }
}

impl fmt::Display for WriteAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteAction::Mirror => f.write_str("mirrored"),
            WriteAction::Skip => f.write_str("skipped"),
            WriteAction::Only(names) => write!(f, "sent only to {}", names.join(", ")),
        }
    }
}

/// `--writes-route REGEX=ACTION`: the action for writes whose path matches.
#[derive(Clone, Debug)]
pub struct WriteRoute {
    pub path: Regex,
    pub action: WriteAction,
}

impl FromStr for WriteRoute {
    type Err = WritePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The action never holds '=', the regex may.
        let (re, action) = s
            .rsplit_once('=')
            .ok_or_else(|| WritePolicyError::Route(s.to_string()))?;
        let path = Regex::new(re).map_err(|error| WritePolicyError::Regex {
            route: s.to_string(),
            error,
        })?;
        Ok(WriteRoute {
            path,
            action: action.parse()?,
        })
    }
}

/// The whole policy: the first route whose regex matches a write's path decides, else the
/// default.
#[derive(Clone, Debug, Default)]
pub struct WritePolicy {
    pub default: WriteAction,
    pub routes: Vec<WriteRoute>,
}

impl WritePolicy {
    /// Checks that every `only:` names one of `mirrors`.
    pub fn check(&self, mirrors: &[String]) -> Result<(), WritePolicyError> {
        let actions = std::iter::once(&self.default).chain(self.routes.iter().map(|r| &r.action));
        for action in actions {
            if let WriteAction::Only(names) = action {
                if let Some(unknown) = names.iter().find(|n| !mirrors.contains(n)) {
                    return Err(WritePolicyError::UnknownMirror(
                        format!("only:{unknown}"),
                        mirrors.join(", "),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The policy as it applies to the mirror named `mirror`.
    pub fn for_mirror(&self, mirror: &str) -> MirrorWrites {
        let allows = |a: &WriteAction| match a {
            WriteAction::Mirror => true,
            WriteAction::Skip => false,
            WriteAction::Only(names) => names.iter().any(|n| n == mirror),
        };
        MirrorWrites {
            default: allows(&self.default),
            routes: self
                .routes
                .iter()
                .map(|r| (r.path.clone(), allows(&r.action)))
                .collect(),
        }
    }

    /// What the agent logs at start: where writes go.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "writes (POST, PUT, PATCH, DELETE, ...) are {}",
            self.default
        );
        for r in &self.routes {
            text.push_str(&format!("; on paths matching {} {}", r.path, r.action));
        }
        text
    }
}

/// The write policy of one mirror, resolved.
#[derive(Clone, Debug)]
pub struct MirrorWrites {
    default: bool,
    routes: Vec<(Regex, bool)>,
}

impl Default for MirrorWrites {
    fn default() -> Self {
        MirrorWrites {
            default: true,
            routes: Vec::new(),
        }
    }
}

impl MirrorWrites {
    /// Whether a request with `method` on `path` (without its query) goes to this mirror.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        safe(method)
            || self
                .routes
                .iter()
                .find(|(re, _)| re.is_match(path))
                .map_or(self.default, |(_, allowed)| *allowed)
    }
}

/// RFC 9110 9.2.1: methods that are read-only by definition.
fn safe(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: &str, routes: &[&str]) -> WritePolicy {
        WritePolicy {
            default: default.parse().unwrap(),
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn the_first_matching_route_decides_per_mirror_and_reads_always_pass() {
        let p = policy(
            "only:staging",
            &[
                "^/payments=skip",
                "^/pkg.Books/(Get|List)=mirror",
                "^/carts/[a-z=]+=only:canary",
            ],
        );
        p.check(&["staging".into(), "canary".into()]).unwrap();
        let (staging, canary) = (p.for_mirror("staging"), p.for_mirror("canary"));
        assert!(staging.allows("POST", "/orders") && !canary.allows("POST", "/orders"));
        assert!(!staging.allows("POST", "/payments/1") && !canary.allows("PUT", "/payments/1"));
        assert!(staging.allows("GET", "/payments/1") && canary.allows("HEAD", "/payments"));
        assert!(canary.allows("POST", "/pkg.Books/GetBook"));
        assert!(!canary.allows("POST", "/pkg.Books/DeleteBook"));
        assert!(canary.allows("DELETE", "/carts/a=b") && !staging.allows("PATCH", "/carts/x"));
        assert!(MirrorWrites::default().allows("DELETE", "/x"));
        assert_eq!(
            p.describe(),
            "writes (POST, PUT, PATCH, DELETE, ...) are sent only to staging; on paths matching \
             ^/payments skipped; on paths matching ^/pkg.Books/(Get|List) mirrored; on paths \
             matching ^/carts/[a-z=]+ sent only to canary"
        );
    }

    #[test]
    fn bad_policies_name_the_fix() {
        for (bad, says) in [
            ("maybe", "unknown write action"),
            ("only:", "unknown write action"),
            ("only:a+", "unknown write action"),
        ] {
            let e = bad.parse::<WriteAction>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("Fix:"), "{e}");
        }
        for (bad, says) in [
            ("^/x", "has no action"),
            ("(=skip", "a regex over the path"),
        ] {
            let e = bad.parse::<WriteRoute>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("Fix:"), "{e}");
        }
        let e = policy("only:stagin", &[])
            .check(&["staging".into()])
            .unwrap_err();
        assert!(e
            .to_string()
            .contains("only:stagin: no mirror has that name (mirrors: staging)"));
    }
}
