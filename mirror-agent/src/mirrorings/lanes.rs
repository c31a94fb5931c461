//! Where the pipeline's events go for declared mirrorings: each mirroring is a lane, with the
//! live servers it covers (its ports, and its pods' addresses), its candidates' replay stages
//! and its own comparison. The table is owned by the pipeline's sink, on the capture thread; the
//! agent changes it only by sending `LaneChange`s, applied between batches.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;

use crate::capture::read_at::ReadAt;
use crate::compare::Comparison;
use crate::http::{LiveContent, Request, ResponseMeta};
use crate::record::Recorder;
use crate::replay::Replayer;

/// One candidate of a lane: its replay stage, and the share of connections it gets.
#[derive(Clone)]
pub struct LaneMirror {
    pub replayer: Replayer,
    /// Parts per million of connections (whole connections, picked by a hash of the id).
    pub sample_ppm: u32,
}

/// A declared mirroring, as the pipeline routes to it.
pub struct Lane {
    pub key: String,
    pub ports: Vec<u16>,
    /// The selected pods' addresses; None: any address (a mirroring without a selector).
    pub pods: Option<HashSet<IpAddr>>,
    pub mirrors: Vec<LaneMirror>,
    pub comparison: Comparison,
    pub record: LaneRecord,
    /// This batch's requests, per mirror.
    pending: Vec<Vec<Request>>,
}

/// Whether a lane records what it covers.
pub enum LaneRecord {
    Off,
    To(Recorder),
    /// Goes on with the recording of the version it replaces (the same rules, the same files).
    KeepPrevious,
}

impl Lane {
    pub fn new(
        key: String,
        ports: Vec<u16>,
        pods: Option<HashSet<IpAddr>>,
        mirrors: Vec<LaneMirror>,
        comparison: Comparison,
        record: LaneRecord,
    ) -> Lane {
        Lane {
            pending: vec![Vec::new(); mirrors.len()],
            key,
            ports,
            pods,
            mirrors,
            comparison,
            record,
        }
    }

    fn recorder(&mut self) -> Option<&mut Recorder> {
        match &mut self.record {
            LaneRecord::To(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the live server at `server` is this mirroring's.
    pub fn covers(&self, server: SocketAddr) -> bool {
        self.ports.contains(&server.port())
            && self
                .pods
                .as_ref()
                .is_none_or(|pods| pods.contains(&server.ip()))
    }
}

/// What the agent changes in the table.
pub enum LaneChange {
    /// A new mirroring, or a new version of one (which replaces it whole).
    Set(Box<Lane>),
    Remove(String),
    /// A pod of a mirroring became mirrored (true) or was forgotten.
    Pod {
        key: String,
        ip: IpAddr,
        mirrored: bool,
    },
}

/// The lanes, owned by the pipeline's sink.
pub struct LaneTable {
    lanes: Vec<Lane>,
    changes: mpsc::Receiver<LaneChange>,
}

/// Whether connection `conn` is in a share of `ppm` parts per million: a hash, so that every
/// request of a connection goes the same way, and candidates with the same share get the same
/// connections.
pub fn sampled(conn: u64, ppm: u32) -> bool {
    if ppm >= 1_000_000 {
        return true;
    }
    // splitmix64's finalizer: consecutive ids spread evenly.
    let mut z = conn.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z % 1_000_000 < u64::from(ppm)
}

impl LaneTable {
    pub fn new(changes: mpsc::Receiver<LaneChange>) -> LaneTable {
        LaneTable {
            lanes: Vec::new(),
            changes,
        }
    }

    /// Applies what the agent changed since the last call.
    pub fn apply_changes(&mut self) {
        while let Ok(change) = self.changes.try_recv() {
            match change {
                LaneChange::Set(mut lane) => {
                    self.flush();
                    match self.lanes.iter_mut().find(|l| l.key == lane.key) {
                        Some(old) => {
                            if matches!(lane.record, LaneRecord::KeepPrevious) {
                                lane.record = std::mem::replace(&mut old.record, LaneRecord::Off);
                            }
                            *old = *lane
                        }
                        None => self.lanes.push(*lane),
                    }
                }
                LaneChange::Remove(key) => {
                    self.flush();
                    self.lanes.retain(|l| l.key != key);
                }
                LaneChange::Pod { key, ip, mirrored } => {
                    let lane = self.lanes.iter_mut().find(|l| l.key == key);
                    if let Some(pods) = lane.and_then(|l| l.pods.as_mut()) {
                        if mirrored {
                            pods.insert(ip);
                        } else {
                            pods.remove(&ip);
                        }
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Queues a request for the candidates (and the recording) of every lane that covers its
    /// server; `at`: where it was read.
    pub fn request(&mut self, r: &Request, at: ReadAt) {
        let (server, conn) = (r.server(), r.conn());
        for lane in self.lanes.iter_mut().filter(|l| l.covers(server)) {
            if let Some(rec) = lane.recorder() {
                rec.request(r, at);
            }
            for (m, pending) in lane.mirrors.iter().zip(&mut lane.pending) {
                if sampled(conn, m.sample_ppm) {
                    pending.push(r.clone());
                }
            }
        }
    }

    pub fn live(&mut self, m: &ResponseMeta) {
        for lane in self.lanes.iter_mut().filter(|l| l.covers(m.server)) {
            lane.comparison.live(m);
            if let Some(rec) = lane.recorder() {
                rec.response(m.clone());
            }
        }
    }

    pub fn live_content(&self, c: &LiveContent) {
        for lane in self.lanes.iter().filter(|l| l.covers(c.server)) {
            lane.comparison.live_content(c);
        }
    }

    /// Hands each candidate its requests of the batch.
    pub fn flush(&mut self) {
        for lane in &mut self.lanes {
            if let Some(rec) = lane.recorder() {
                rec.flush();
            }
            for (m, pending) in lane.mirrors.iter().zip(&mut lane.pending) {
                if !pending.is_empty() {
                    m.replayer.offer(pending.drain(..));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_connections_is_about_that_share_and_stable() {
        let n = (0..100_000u64).filter(|c| sampled(*c, 250_000)).count();
        assert!((23_500..26_500).contains(&n), "{n} of 100000 at 25 %");
        assert!((0..1000u64).all(|c| sampled(c, 1_000_000)));
        assert!(!(0..1000u64).any(|c| sampled(c, 0)));
        let first: Vec<bool> = (0..100).map(|c| sampled(c, 500_000)).collect();
        let again: Vec<bool> = (0..100).map(|c| sampled(c, 500_000)).collect();
        assert_eq!(first, again);
        // A smaller share is a subset of a larger one.
        assert!((0..10_000u64).all(|c| !sampled(c, 100_000) || sampled(c, 300_000)));
    }

    #[test]
    fn a_lane_covers_its_ports_on_its_pods_only() {
        let comparison = Comparison::from(crate::compare::Comparator::new(Default::default()));
        let pods: HashSet<IpAddr> = ["10.1.0.2".parse().unwrap()].into();
        let lane = Lane::new(
            "ns/a".into(),
            vec![8080],
            Some(pods),
            vec![],
            comparison.clone(),
            LaneRecord::Off,
        );
        assert!(lane.covers("10.1.0.2:8080".parse().unwrap()));
        assert!(!lane.covers("10.1.0.2:9090".parse().unwrap()));
        assert!(!lane.covers("10.1.0.3:8080".parse().unwrap()));
        let any = Lane::new(
            "ns/b".into(),
            vec![8080],
            None,
            vec![],
            comparison,
            LaneRecord::Off,
        );
        assert!(any.covers("192.0.2.1:8080".parse().unwrap()));
    }
}
