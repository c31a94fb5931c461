//! Headers whose values come from files (`--secret-header`), such as a staging token in a
//! mounted Kubernetes Secret, so that a candidate gets its own credentials and never
//! production's. The files are re-read every second: a rotated Secret (Kubernetes swaps the
//! mounted files) takes effect without a restart, and a file that cannot be read keeps the last
//! good value, with a warning.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "{0:?} is not NAME: [PREFIX]@FILE. Fix: e.g. 'Authorization: Bearer @/run/secrets/token'"
    )]
    Spec(String),
    #[error(
        "{}: {error}. Fix: mount the file (a Secret volume) or correct the path",
        path.display()
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: the value is empty or not a valid header value. Fix: one line of visible text",
        .0.display()
    )]
    Value(PathBuf),
}

/// `NAME: [PREFIX]@FILE` as given.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretSpec {
    pub name: HeaderName,
    pub prefix: String,
    pub path: PathBuf,
}

impl FromStr for SecretSpec {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SecretError::Spec(s.to_string());
        let (name, rest) = s.split_once(':').ok_or_else(bad)?;
        let name = HeaderName::from_str(name.trim()).map_err(|_| bad())?;
        let (prefix, path) = rest.trim_start().split_once('@').ok_or_else(bad)?;
        if path.is_empty() {
            return Err(bad());
        }
        Ok(SecretSpec {
            name,
            prefix: prefix.to_string(),
            path: path.into(),
        })
    }
}

/// A header whose value is read from a file, current as of the last re-read.
#[derive(Debug)]
pub struct SecretHeader {
    pub spec: SecretSpec,
    value: RwLock<HeaderValue>,
}

impl SecretHeader {
    /// Reads the file now: a start with a missing or bad secret fails, naming the file.
    pub fn load(spec: SecretSpec) -> Result<Arc<SecretHeader>, SecretError> {
        let value = read(&spec.prefix, &spec.path)?;
        Ok(Arc::new(SecretHeader {
            spec,
            value: RwLock::new(value),
        }))
    }

    pub fn name(&self) -> &HeaderName {
        &self.spec.name
    }

    /// The value to send.
    pub fn value(&self) -> HeaderValue {
        self.value.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the file again: whether the value changed. On an error the last value stays.
    pub fn refresh(&self) -> Result<bool, SecretError> {
        let fresh = read(&self.spec.prefix, &self.spec.path)?;
        let mut value = self.value.write().unwrap_or_else(|e| e.into_inner());
        let changed = *value != fresh;
        *value = fresh;
        Ok(changed)
    }
}

fn read(prefix: &str, path: &Path) -> Result<HeaderValue, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|error| SecretError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    // A Secret written with `echo` ends with a newline that is not part of the token.
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(SecretError::Value(path.to_path_buf()));
    }
    HeaderValue::from_str(&format!("{prefix}{secret}"))
        .map_err(|_| SecretError::Value(path.to_path_buf()))
}

/// Re-reads secrets on a thread of its own until dropped.
pub struct SecretWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the files are read again.
pub const REREAD_EVERY: Duration = Duration::from_secs(1);

impl SecretWatch {
    pub fn start(secrets: Vec<Arc<SecretHeader>>, every: Duration) -> std::io::Result<SecretWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = (!secrets.is_empty())
            .then(|| {
                std::thread::Builder::new()
                    .name("secrets".into())
                    .spawn(move || watch(&secrets, every, &stopped))
            })
            .transpose()?;
        Ok(SecretWatch { stop, thread })
    }
}

fn watch(secrets: &[Arc<SecretHeader>], every: Duration, stop: &AtomicBool) {
    // The last error per secret, so that a lasting one is logged once.
    let mut failing: Vec<Option<String>> = vec![None; secrets.len()];
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(every);
        for (secret, last) in secrets.iter().zip(&mut failing) {
            match secret.refresh() {
                Ok(changed) => {
                    if changed || last.is_some() {
                        log::info!(
                            "{}: read again from {}",
                            secret.name(),
                            secret.spec.path.display()
                        );
                    }
                    *last = None;
                }
                Err(e) => {
                    let text = e.to_string();
                    if last.as_deref() != Some(text.as_str()) {
                        log::warn!("{}: keeping the last value: {text}", secret.name());
                    }
                    *last = Some(text);
                }
            }
        }
    }
}

impl Drop for SecretWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_name_the_fix() {
        let s: SecretSpec = "Authorization: Bearer @/run/secrets/token".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.prefix.as_str()),
            ("authorization", "Bearer ")
        );
        assert_eq!(s.path, PathBuf::from("/run/secrets/token"));
        let s: SecretSpec = "X-Api-Key:@/k".parse().unwrap();
        assert_eq!((s.prefix.as_str(), s.path.to_str()), ("", Some("/k")));
        for bad in [
            "Authorization",
            "Authorization: Bearer",
            "Bad Name: @/k",
            "X: @",
        ] {
            let e = bad.parse::<SecretSpec>().unwrap_err().to_string();
            assert!(e.contains("Fix:"), "{e}");
        }
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "staging-1\n").unwrap();
        let spec: SecretSpec = format!("Authorization: Bearer @{}", path.display())
            .parse()
            .unwrap();
        let secret = SecretHeader::load(spec).unwrap();
        assert_eq!(secret.value(), "Bearer staging-1");
        assert!(!secret.refresh().unwrap());
        std::fs::write(&path, "staging-2").unwrap();
        assert!(secret.refresh().unwrap());
        assert_eq!(secret.value(), "Bearer staging-2");
        std::fs::remove_file(&path).unwrap();
        let e = secret.refresh().unwrap_err().to_string();
        assert!(e.contains("token") && e.contains("Fix:"), "{e}");
        assert_eq!(secret.value(), "Bearer staging-2");
        std::fs::write(&path, "two\nlines").unwrap();
        assert!(secret.refresh().is_err());
        assert_eq!(secret.value(), "Bearer staging-2");
        // A missing file at start is an error, not an empty header.
        std::fs::remove_file(&path).unwrap();
        let spec = secret.spec.clone();
        assert!(SecretHeader::load(spec).is_err());
    }

    #[test]
    fn the_watch_picks_up_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "a").unwrap();
        let spec: SecretSpec = format!("X-Token: @{}", path.display()).parse().unwrap();
        let secret = SecretHeader::load(spec).unwrap();
        let watch =
            SecretWatch::start(vec![Arc::clone(&secret)], Duration::from_millis(20)).unwrap();
        std::fs::write(&path, "b").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while secret.value() != "b" && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(secret.value(), "b");
        drop(watch);
    }
}
