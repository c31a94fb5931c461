//! A candidate's rewrite of the request target: its path by a regular expression, its query
//! parameters set or removed. For a candidate whose routes moved (`/api/v1/` → `/api/v2/`), or
//! that needs a flag (`?shadow=1`) or must not get a parameter (`session`).

use std::borrow::Cow;
use std::str::FromStr;

use regex::Regex;

#[derive(Clone, Debug, Default)]
pub struct TargetRewrite {
    /// The first match in the path (before the query) is replaced; `$1`, `${name}` refer to
    /// the match's groups.
    pub path: Option<(Regex, String)>,
    /// Parameters set, replacing any of the same name, in this order at the query's end.
    pub set_query: Vec<(String, String)>,
    /// Parameters removed, every one of the name.
    pub drop_query: Vec<String>,
}

/// Why a rewrite does not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RewriteError {
    #[error("{0:?}: give REGEX=REPLACEMENT")]
    NoEquals(String),
    #[error("{spec:?}: {detail}")]
    Regex { spec: String, detail: String },
}

/// `REGEX=REPLACEMENT` (`--rewrite-path`); the last `=` separates them, so that the regex may
/// hold one.
pub fn parse_path_rewrite(s: &str) -> Result<(Regex, String), RewriteError> {
    let (re, to) = s
        .rsplit_once('=')
        .ok_or_else(|| RewriteError::NoEquals(s.to_string()))?;
    let re = Regex::from_str(re).map_err(|e| RewriteError::Regex {
        spec: s.to_string(),
        detail: e.to_string(),
    })?;
    Ok((re, to.to_string()))
}

impl TargetRewrite {
    pub fn is_empty(&self) -> bool {
        self.path.is_none() && self.set_query.is_empty() && self.drop_query.is_empty()
    }

    /// `target` (origin form: `/path?query`) rewritten.
    pub fn apply<'a>(&self, target: &'a str) -> Cow<'a, str> {
        if self.is_empty() {
            return Cow::Borrowed(target);
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let path = match &self.path {
            Some((re, to)) => re.replace(path, to.as_str()),
            None => Cow::Borrowed(path),
        };
        let kept = query.into_iter().flat_map(|q| q.split('&')).filter(|kv| {
            let name = kv.split('=').next().unwrap_or("");
            !kv.is_empty()
                && !self.drop_query.iter().any(|d| d == name)
                && !self.set_query.iter().any(|(s, _)| s == name)
        });
        let set = self
            .set_query
            .iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)));
        let params: Vec<String> = kept.map(str::to_string).chain(set).collect();
        if params.is_empty() {
            Cow::Owned(path.into_owned())
        } else {
            Cow::Owned(format!("{path}?{}", params.join("&")))
        }
    }
}

/// Percent-encodes what is not unreserved (RFC 3986), as a query's names and values need.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_and_the_query_are_rewritten_and_the_rest_kept() {
        let rw = TargetRewrite {
            path: Some(parse_path_rewrite("^/api/v1/(\\w+)=/api/v2/$1").unwrap()),
            set_query: vec![
                ("shadow".into(), "1".into()),
                ("who".into(), "a b&c".into()),
            ],
            drop_query: vec!["session".into()],
        };
        assert_eq!(
            rw.apply("/api/v1/books/7?session=x&page=2&shadow=0&session=y"),
            "/api/v2/books/7?page=2&shadow=1&who=a%20b%26c"
        );
        assert_eq!(rw.apply("/health"), "/health?shadow=1&who=a%20b%26c");
        let drop_only = TargetRewrite {
            drop_query: vec!["token".into()],
            ..TargetRewrite::default()
        };
        assert_eq!(drop_only.apply("/a?token=1"), "/a");
        assert_eq!(drop_only.apply("/a?b&token=1&&c=3"), "/a?b&c=3");
        assert!(matches!(
            TargetRewrite::default().apply("/x?y"),
            Cow::Borrowed("/x?y")
        ));
    }

    #[test]
    fn a_path_rewrite_without_equals_or_with_a_bad_regex_is_refused() {
        assert_eq!(
            parse_path_rewrite("^/a").unwrap_err(),
            RewriteError::NoEquals("^/a".into())
        );
        assert!(matches!(
            parse_path_rewrite("(=/b"),
            Err(RewriteError::Regex { .. })
        ));
        let (re, to) = parse_path_rewrite("^/a=b=/c").unwrap();
        assert_eq!((re.as_str(), to.as_str()), ("^/a=b", "/c"));
    }
}
