//! Endpoint names: `METHOD /path` with identifiers folded, or a user's route template.

/// A user's route template, e.g. `/api/books/{id}/reviews`: `{…}` matches one path segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTemplate {
    text: String,
    segments: Vec<Option<String>>,
}

impl std::str::FromStr for RouteTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("route {s:?} must start with /"));
        }
        let segments = s
            .split('/')
            .skip(1)
            .map(|seg| {
                if seg.starts_with('{') && seg.ends_with('}') {
                    None
                } else {
                    Some(seg.to_string())
                }
            })
            .collect();
        Ok(RouteTemplate {
            text: s.to_string(),
            segments,
        })
    }
}

impl RouteTemplate {
    fn matches(&self, path: &str) -> bool {
        let mut parts = path.split('/').skip(1);
        for seg in &self.segments {
            match (parts.next(), seg) {
                (None, _) => return false,
                (Some(p), Some(lit)) if p != lit => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

/// `METHOD /path` with the query dropped and identifier-like segments (numbers, UUIDs, long hex)
/// replaced by `{id}`, unless a route template matches first.
pub fn endpoint_name(method: &str, target: &str, routes: &[RouteTemplate]) -> String {
    let mut out = String::new();
    write_endpoint_name(&mut out, method, target, routes);
    out
}

/// `endpoint_name` into `out` (cleared first): a buffer kept from call to call allocates
/// nothing for names already seen.
pub fn write_endpoint_name(out: &mut String, method: &str, target: &str, routes: &[RouteTemplate]) {
    out.clear();
    // Absolute-form targets keep only their path.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map(|p| &target[i + 3 + p..])
            .unwrap_or("/"),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let path = if path.is_empty() { "/" } else { path };
    out.push_str(method);
    out.push(' ');
    if let Some(r) = routes.iter().find(|r| r.matches(path)) {
        out.push_str(&r.text);
        return;
    }
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_identifier(seg) { "{id}" } else { seg });
    }
}

fn is_identifier(seg: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    // A UUID: 8-4-4-4-12 hex digits.
    if seg.len() == 36
        && seg.split('-').map(str::len).eq([8, 4, 4, 4, 12])
        && seg.split('-').all(hex)
    {
        return true;
    }
    seg.len() >= 16 && hex(seg)
}
