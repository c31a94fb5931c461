//! Content comparison (`--compare-bodies`): each mirror's response is compared with the live
//! response to the same request, and differences are counted per endpoint, mirror and field
//! path, with one example pair of values.
//!
//! Noise is what differs where nothing changed: between live and a secondary mirror running
//! the live version (`--secondary`), and between two live responses to the same idempotent
//! request (learned as traffic goes by). A path is a candidate regression only where its
//! difference rate clearly exceeds its noise rate: by more than `ABSOLUTE` (3 points) and by
//! more than `RELATIVE` (20 %) of the noise rate, after Diffy's absolute and relative
//! thresholds. Paths the user lists (`--ignore`) are not compared at all.
//!
//! Memory is bounded: requests waiting for their other halves (`max_pending`, and
//! `max_bytes` of bodies), paths per endpoint and mirror (`MAX_PATHS`, the rest as `other`),
//! and the live responses remembered for learning noise (`MAX_REMEMBERED`, and a quarter of
//! `max_bytes`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::content::{compare, ContentConfig, FieldDiff};
use super::waiting::Waiting;
use super::PairKey;
use crate::exchange::content::Content;

/// A path's candidate rate must exceed its noise rate by this much (absolute)…
pub const ABSOLUTE: f64 = 0.03;
/// …and by this share of the noise rate (relative).
pub const RELATIVE: f64 = 0.2;
/// Field paths tracked per endpoint and mirror; more are counted under `other`.
pub const MAX_PATHS: usize = 32;
/// Live responses remembered to learn noise from repeated idempotent requests.
const MAX_REMEMBERED: usize = 1024;

/// How content is compared.
#[derive(Clone, Debug, Default)]
pub struct DiffConfig {
    pub content: ContentConfig,
    /// Paths never compared (a path and everything below it).
    pub ignore: Vec<String>,
    /// The mirror (0-based) that runs the live version: its differences are noise.
    pub secondary: Option<usize>,
    /// Requests whose contents wait for their other halves, at most.
    pub max_pending: usize,
    /// Bytes of content held while waiting, at most.
    pub max_bytes: usize,
}

/// Per endpoint and mirror, what comparing contents found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentRow {
    pub name: String,
    pub mirror: String,
    /// The mirror runs the live version (`--secondary`): its differences are noise.
    pub secondary: bool,
    pub compared: u64,
    pub identical: u64,
    pub differing: u64,
    /// Of `compared`, bodies compared by length and digest only (not JSON, or over the cap).
    pub by_digest: u64,
    /// Differing paths, most frequent first.
    pub fields: Vec<FieldRow>,
}

/// One field path's differences.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldRow {
    pub path: String,
    /// Requests where it differed.
    pub differing: u64,
    /// `differing / compared`.
    pub rate: f64,
    /// The same path's noise rate (secondary, or repeated live responses).
    pub noise_rate: f64,
    /// Exceeds its noise by the thresholds; never true of the secondary itself.
    pub regression: bool,
    /// An example pair of values (cut); None where the field was absent on that side.
    pub live_example: Option<String>,
    pub mirror_example: Option<String>,
}

/// Contents that could not be compared, by reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NotCompared {
    /// The mirror failed (timeout, reset, …).
    pub mirror_failed: u64,
    /// Answers without content: HTTP/2 and gRPC, whose contents are not compared yet.
    pub unsupported: u64,
    /// The live response was never read whole (bytes not captured, lost, or evicted first).
    pub no_live: u64,
    /// Over the memory bound for contents waiting.
    pub memory: u64,
    /// Passed over while the comparison's thread was behind (`compare::worker`).
    #[serde(default)]
    pub busy: u64,
}

#[derive(Default)]
struct PathStat {
    count: u64,
    example: Option<FieldDiff>,
}

#[derive(Default)]
struct Tally {
    compared: u64,
    differing: u64,
    by_digest: u64,
    paths: BTreeMap<String, PathStat>,
}

impl Tally {
    fn add(&mut self, diffs: BTreeMap<String, FieldDiff>, by_digest: bool) {
        self.compared += 1;
        self.by_digest += u64::from(by_digest);
        if diffs.is_empty() {
            return;
        }
        self.differing += 1;
        let mut other = false;
        for (path, diff) in diffs {
            if !self.paths.contains_key(&path) && self.paths.len() >= MAX_PATHS {
                other = true;
                continue;
            }
            let s = self.paths.entry(path).or_default();
            s.count += 1;
            s.example.get_or_insert(diff);
        }
        if other {
            // Once per request, so that `other`'s rate is over requests too.
            self.paths.entry("other".into()).or_default().count += 1;
        }
    }

    fn rate(&self, path: &str) -> f64 {
        match self.paths.get(path) {
            Some(s) if self.compared > 0 => s.count as f64 / self.compared as f64,
            _ => 0.0,
        }
    }
}

#[derive(Default)]
struct Halves {
    live: Option<Arc<Content>>,
    /// Mirror contents that came before the live one, with their endpoint.
    early: Vec<(usize, String, Arc<Content>)>,
    /// Mirrors done with this request (compared, failed, or not kept).
    done: usize,
}

impl Halves {
    /// Bytes of the contents held.
    fn held(&self) -> usize {
        self.live.as_ref().map_or(0, |c| c.held())
            + self.early.iter().map(|(_, _, c)| c.held()).sum::<usize>()
    }
}

/// A waiting request made room for: its bytes are freed, and mirror answers that never met
/// their live response are counted.
fn evicted(held: &mut usize, not_compared: &mut NotCompared, w: &Halves) {
    if w.live.is_none() {
        not_compared.no_live += w.early.len() as u64;
    }
    *held = held.saturating_sub(w.held());
}

/// The content comparison's state; lives inside the `Comparator`.
pub struct ContentDiffs {
    cfg: DiffConfig,
    mirrors: usize,
    waiting: Waiting<Halves>,
    /// Bytes of the contents in `waiting`.
    held: usize,
    tallies: BTreeMap<(String, usize), Tally>,
    /// Live vs live, per endpoint.
    live_noise: BTreeMap<String, Tally>,
    remembered: HashMap<(String, String), Arc<Content>>,
    remembered_order: VecDeque<(String, String)>,
    /// Bytes of the remembered responses, at most a quarter of `max_bytes`.
    remembered_held: usize,
    not_compared: NotCompared,
}

impl ContentDiffs {
    pub fn new(cfg: DiffConfig, mirrors: usize) -> Self {
        ContentDiffs {
            cfg,
            mirrors,
            waiting: Waiting::new(),
            held: 0,
            tallies: BTreeMap::new(),
            live_noise: BTreeMap::new(),
            remembered: HashMap::new(),
            remembered_order: VecDeque::new(),
            remembered_held: 0,
            not_compared: NotCompared::default(),
        }
    }

    /// A live response read whole.
    pub fn live(
        &mut self,
        key: PairKey,
        endpoint: &str,
        method: &str,
        target: &str,
        c: Arc<Content>,
    ) {
        self.learn_noise(endpoint, method, target, &c);
        let early = {
            let Some(w) = self.slot(key, c.held()) else {
                return;
            };
            w.live = Some(Arc::clone(&c));
            std::mem::take(&mut w.early)
        };
        self.held += c.held();
        for (mirror, name, m) in early {
            self.held = self.held.saturating_sub(m.held());
            self.tally(&name, mirror, &c, &m);
            self.mirror_done(key);
        }
    }

    /// Mirror `mirror`'s answer: its content, or None when it failed (`answered` false) or
    /// came without one.
    pub fn mirror(
        &mut self,
        key: PairKey,
        endpoint: &str,
        mirror: usize,
        answered: bool,
        c: Option<Arc<Content>>,
    ) {
        let Some(c) = c else {
            if answered {
                self.not_compared.unsupported += 1;
            } else {
                self.not_compared.mirror_failed += 1;
            }
            if self.slot(key, 0).is_some() {
                self.mirror_done(key);
            }
            return;
        };
        let live = {
            let Some(w) = self.slot(key, c.held()) else {
                return;
            };
            match &w.live {
                Some(l) => Some(Arc::clone(l)),
                None => {
                    w.early.push((mirror, endpoint.to_string(), Arc::clone(&c)));
                    None
                }
            }
        };
        match live {
            Some(l) => {
                self.tally(endpoint, mirror, &l, &c);
                self.mirror_done(key);
            }
            None => self.held += c.held(),
        }
    }

    /// The request's waiting slot, made room for; None when `bytes` more do not fit.
    fn slot(&mut self, key: PairKey, bytes: usize) -> Option<&mut Halves> {
        while self.held + bytes > self.cfg.max_bytes {
            let Some(w) = self.waiting.evict_oldest() else {
                break;
            };
            evicted(&mut self.held, &mut self.not_compared, &w);
        }
        if self.held + bytes > self.cfg.max_bytes {
            self.not_compared.memory += 1;
            return None;
        }
        let (held, not_compared) = (&mut self.held, &mut self.not_compared);
        Some(self.waiting.entry(key, self.cfg.max_pending, |w| {
            evicted(held, not_compared, &w)
        }))
    }

    fn mirror_done(&mut self, key: PairKey) {
        let Some(w) = self.waiting.get_mut(&key) else {
            return;
        };
        w.done += 1;
        if w.done >= self.mirrors {
            if let Some(w) = self.waiting.remove(&key) {
                self.held = self.held.saturating_sub(w.held());
            }
        }
    }

    /// Requests waiting now, and the bytes they hold.
    pub fn waiting(&self) -> (usize, usize) {
        (self.waiting.len(), self.held)
    }

    fn compare(&self, live: &Content, mirror: &Content) -> (BTreeMap<String, FieldDiff>, bool) {
        let mut d = compare(live, mirror, &self.cfg.content);
        d.paths.retain(|p, _| !self.ignored(p));
        (d.paths, d.by_digest)
    }

    fn ignored(&self, path: &str) -> bool {
        self.cfg.ignore.iter().any(|i| {
            path == i
                || path
                    .strip_prefix(i.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }

    fn tally(&mut self, endpoint: &str, mirror: usize, live: &Content, m: &Content) {
        let (diffs, by_digest) = self.compare(live, m);
        self.tallies
            .entry((endpoint.to_string(), mirror))
            .or_default()
            .add(diffs, by_digest);
    }

    /// Two live responses to the same idempotent request: what differs between them is noise.
    fn learn_noise(&mut self, endpoint: &str, method: &str, target: &str, c: &Arc<Content>) {
        if !matches!(method, "GET" | "HEAD") {
            return;
        }
        let key = (method.to_string(), target.to_string());
        if let Some(prev) = self.remembered.get(&key) {
            let (diffs, by_digest) = self.compare(prev, c);
            self.live_noise
                .entry(endpoint.to_string())
                .or_default()
                .add(diffs, by_digest);
        }
        let budget = self.cfg.max_bytes / 4;
        if c.held() > budget {
            return;
        }
        match self.remembered.get_mut(&key) {
            Some(old) => {
                // Keeps its place in the order: the first asked goes first.
                self.remembered_held = self.remembered_held - old.held() + c.held();
                *old = Arc::clone(c);
            }
            None => {
                self.remembered_held += c.held();
                self.remembered_order.push_back(key.clone());
                self.remembered.insert(key, Arc::clone(c));
            }
        }
        while self.remembered.len() > MAX_REMEMBERED || self.remembered_held > budget {
            let Some(old) = self.remembered_order.pop_front() else {
                break;
            };
            if let Some(gone) = self.remembered.remove(&old) {
                self.remembered_held -= gone.held();
            }
        }
    }

    /// The noise rate of a path on an endpoint: the larger of the secondary's and live's own.
    fn noise(&self, endpoint: &str, path: &str) -> f64 {
        let secondary = self
            .cfg
            .secondary
            .and_then(|s| self.tallies.get(&(endpoint.to_string(), s)))
            .map_or(0.0, |t| t.rate(path));
        let live = self.live_noise.get(endpoint).map_or(0.0, |t| t.rate(path));
        secondary.max(live)
    }

    pub fn not_compared(&self) -> NotCompared {
        self.not_compared.clone()
    }

    /// Rows for the report; `label` names mirror `n`.
    pub fn rows(&self, label: impl Fn(usize) -> String) -> Vec<ContentRow> {
        self.tallies
            .iter()
            .map(|((name, mirror), t)| {
                let secondary = self.cfg.secondary == Some(*mirror);
                let mut fields: Vec<FieldRow> = t
                    .paths
                    .iter()
                    .map(|(path, s)| {
                        let rate = s.count as f64 / t.compared.max(1) as f64;
                        let noise_rate = self.noise(name, path);
                        FieldRow {
                            path: path.clone(),
                            differing: s.count,
                            rate,
                            noise_rate,
                            regression: !secondary && exceeds_noise(rate, noise_rate),
                            live_example: s.example.as_ref().and_then(|e| e.live.clone()),
                            mirror_example: s.example.as_ref().and_then(|e| e.mirror.clone()),
                        }
                    })
                    .collect();
                fields.sort_by(|a, b| b.differing.cmp(&a.differing).then(a.path.cmp(&b.path)));
                ContentRow {
                    name: name.clone(),
                    mirror: label(*mirror),
                    secondary,
                    compared: t.compared,
                    identical: t.compared - t.differing,
                    differing: t.differing,
                    by_digest: t.by_digest,
                    fields,
                }
            })
            .collect()
    }
}

/// The rule that tells a regression from noise (see the module's documentation).
pub fn exceeds_noise(rate: f64, noise: f64) -> bool {
    rate - noise > ABSOLUTE && rate > noise * (1.0 + RELATIVE)
}
