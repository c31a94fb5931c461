//! Where declared mirrorings come from: TrafficMirror objects in the Kubernetes API
//! (`--traffic-mirrors`, watched with kube-rs's watcher, which relists after `410 Gone`), or a
//! YAML file of them (`--config`), read again when it changes or on SIGHUP. Each change sends the
//! whole declared set; a file that does not parse changes nothing (the last good set keeps
//! running) and is logged with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::spec::{self, SpecError, TrafficMirror, TrafficMirrorSpec};

/// A declared mirroring: its spec, and which version of it (the object's generation; 0 in a
/// file).
#[derive(Clone, Debug, PartialEq)]
pub struct Declaration {
    pub spec: TrafficMirrorSpec,
    pub generation: i64,
}

/// A declared set, by `namespace/name`.
pub type Declared = BTreeMap<String, Declaration>;

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
        .map(|(k, tm)| {
            let declared = Declaration {
                spec: tm.spec,
                generation: 0,
            };
            (k, declared)
        })
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

/// Sends the TrafficMirrors in `namespace` (None: all) as they change, until `tx` is closed. API
/// errors are logged with what to fix and retried with backoff; what runs keeps running.
pub async fn watch_cluster(client: Client, namespace: Option<String>, tx: mpsc::Sender<Declared>) {
    let api: Api<TrafficMirror> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut objects = Declared::new();
    let mut listing = Declared::new();
    let mut listed = false;
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(watcher::Event::Apply(tm)) => {
                let (key, d) = declaration(&tm);
                objects.insert(key, d.clone()).as_ref() != Some(&d)
            }
            Ok(watcher::Event::Delete(tm)) => objects.remove(&spec::key_of(&tm)).is_some(),
            Ok(watcher::Event::Init) => {
                listing.clear();
                false
            }
            Ok(watcher::Event::InitApply(tm)) => {
                let (key, d) = declaration(&tm);
                listing.insert(key, d);
                false
            }
            Ok(watcher::Event::InitDone) => {
                let changed = !listed || listing != objects;
                objects = std::mem::take(&mut listing);
                listed = true;
                log::info!("TrafficMirrors: {} declared", objects.len());
                changed
            }
            Err(e) => {
                log::warn!("{}", explain(&e));
                false
            }
        };
        if changed && listed && tx.send(objects.clone()).await.is_err() {
            return;
        }
    }
}

fn declaration(tm: &TrafficMirror) -> (String, Declaration) {
    let d = Declaration {
        spec: tm.spec.clone(),
        generation: tm.metadata.generation.unwrap_or(0),
    };
    (spec::key_of(tm), d)
}

/// A watch error with what to do about it.
fn explain(e: &watcher::Error) -> String {
    let text = e.to_string();
    if text.contains("404") {
        format!(
            "the Kubernetes API has no TrafficMirror resource ({text}): apply \
             deploy/trafficmirror-crd.yaml; retrying"
        )
    } else if text.contains("403") || text.to_ascii_lowercase().contains("forbidden") {
        format!(
            "the Kubernetes API refused to list or watch TrafficMirrors ({text}): the agent's \
             ServiceAccount needs get, list and watch on trafficmirrors.mirror-agent.dev \
             (deploy/daemonset.yaml has the ClusterRole); retrying"
        )
    } else {
        format!("watching TrafficMirrors failed ({text}); retrying with backoff, mirrorings keep running")
    }
}
