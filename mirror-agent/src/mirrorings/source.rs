//! Where declared mirrorings come from: a YAML file of TrafficMirror objects (`--config`), read
//! again when it changes or on SIGHUP. Each read sends the whole declared set; a file that does
//! not parse changes nothing (the last good set keeps running) and is logged with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::spec::{self, SpecError, TrafficMirrorSpec};

/// A declared set: each mirroring's spec by `namespace/name`.
pub type Declared = BTreeMap<String, TrafficMirrorSpec>;

/// How often the file's modification time and size are looked at.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Reads `path` once: the declared set, or what is wrong with the file.
pub fn read(path: &Path) -> Result<Declared, SpecError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::File {
        file: name.clone(),
        detail: e.to_string(),
    })?;
    Ok(spec::from_yaml(&name, &text)?
        .into_iter()
        .map(|(k, tm)| (k, tm.spec))
        .collect())
}

/// What identifies a version of the file without reading it.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Sends the file's declared set now and whenever it changes, until `tx` is closed. Must run
/// on a runtime (SIGHUP is received through it).
pub async fn watch_file(path: PathBuf, tx: mpsc::Sender<Declared>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("--config: no SIGHUP handler ({e}); changes are still seen within a second");
            None
        }
    };
    let mut seen = None;
    let mut last: Option<Declared> = None;
    let mut tick = tokio::time::interval(LOOK_EVERY);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
        };
        let now = stamp(&path);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match read(&path) {
            Ok(declared) if last.as_ref() == Some(&declared) => {}
            Ok(declared) => {
                log::info!(
                    "--config {}: {} mirrorings declared",
                    path.display(),
                    declared.len()
                );
                last = Some(declared.clone());
                if tx.send(declared).await.is_err() {
                    return;
                }
            }
            Err(e) => log::warn!(
                "--config: {e}; the mirrorings declared before keep running until the file is fixed"
            ),
        }
    }
}
