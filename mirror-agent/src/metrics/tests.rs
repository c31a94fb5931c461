use super::*;
use crate::compare::{Comparator, CompareConfig};
use crate::exchange::{MirrorOutcome, MirrorResult};
use crate::http::ResponseMeta;

fn sources() -> Sources {
    let mut c = Comparator::new(CompareConfig::default());
    let meta = ResponseMeta {
        conn: 1,
        server: "10.0.0.2:80".parse().unwrap(),
        request_seq: 0,
        method: "GET".into(),
        target: "/api/books/2/reviews".into(),
        status: 200,
        grpc_status: None,
        request_last_ts: 0,
        response_first_ts: 2_000_000,
    };
    c.live(&meta);
    let mut lane = Comparator::new(CompareConfig {
        live_label: "v1".into(),
        mirror_labels: vec!["v3".into()],
        ..CompareConfig::default()
    });
    lane.live(&meta);
    let lane = crate::compare::Comparison::from(lane);
    c.mirror(
        0,
        &MirrorOutcome {
            conn: 1,
            seq: 0,
            method: "GET".into(),
            target: "/api/books/2/reviews".into(),
            result: MirrorResult::Status(500),
            duration: Some(std::time::Duration::from_millis(30)),
            content: None,
        },
    );
    Sources {
        pods: Default::default(),
        comparison: c.into(),
        capture: Some(Arc::new(CaptureStats::default())),
        kernel: Arc::new(Mutex::new(crate::capture::KernelReport {
            packets: vec![("cloned", 3), ("skip_not_tcp", 1)],
            work: std::time::Duration::from_millis(1500),
        })),
        pipeline: Arc::new(Mutex::new(PipelineStats::default())),
        replay: vec![("mirror".into(), Arc::new(ReplayStats::default()))],
        record: Some(Default::default()),
        tls: Some(Default::default()),
        read_at: Default::default(),
        lanes: Arc::new(Mutex::new(vec![crate::mirrorings::LaneView {
            key: "shop/reviews".into(),
            comparison: lane,
            replay: vec![("v3".into(), Arc::new(ReplayStats::default()))],
            record: Some(Default::default()),
        }])),
    }
}

#[test]
fn exports_the_comparison_and_every_stage() {
    let text = render(&sources());
    for line in [
        r#"mirror_requests_total{endpoint="GET /api/books/{id}/reviews",version="mirror",code="500"} 1"#,
        r#"mirror_status_mismatch_total{endpoint="GET /api/books/{id}/reviews",mirror="mirror",live_code="200",mirror_code="500"} 1"#,
        r#"mirror_kernel_packets_total{outcome="cloned"} 3"#,
        r#"mirror_requests_total{mirroring="shop/reviews",endpoint="GET /api/books/{id}/reviews",version="v1",code="200"} 1"#,
        r#"mirror_replay_offered_total{mirroring="shop/reviews",mirror="v3"} 0"#,
        r#"mirror_record_records_total{mirroring="shop/reviews",kind="request"} 0"#,
        r#"mirror_record_blocks_total{mirroring="shop/reviews"} 0"#,
        "\nmirror_record_blocks_total 0\n",
        "mirror_kernel_work_seconds_total 1.5",
        r#"mirror_http_dropped_total{reason="gap"} 0"#,
        r#"mirror_replay_errors_total{mirror="mirror",kind="timeout"} 0"#,
        r#"mirror_replay_sent_total{mirror="mirror"} 0"#,
        r#"mirror_capture_frame_errors_total{reason="malformed"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    assert!(text.contains(r#"mirror_request_duration_seconds_bucket{le="0.0025",endpoint="GET /api/books/{id}/reviews",version="live",code="200"} 1"#), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())));
    assert!(parsed.is_ok(), "the exposition parses");
}

/// A comparison of contents that has compared one answer: `$.rating` differs.
fn compared_contents() -> crate::compare::Comparison {
    use crate::compare::diffs::DiffConfig;
    use crate::exchange::content::{Body, Content};
    let c = crate::compare::Comparison::new(CompareConfig {
        diffs: Some(DiffConfig {
            max_pending: 10,
            max_bytes: 1 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    let content = |b: &'static str| {
        Arc::new(Content::new(
            "200".into(),
            vec![],
            Body::Whole(bytes::Bytes::from_static(b.as_bytes())),
        ))
    };
    c.live_content(&crate::http::LiveContent {
        conn: 1,
        server: "10.0.0.2:80".parse().unwrap(),
        request_seq: 0,
        method: "GET".into(),
        target: "/a".into(),
        content: content(r#"{"rating":4.5}"#),
    });
    c.mirror(
        0,
        &MirrorOutcome {
            conn: 1,
            seq: 0,
            method: "GET".into(),
            target: "/a".into(),
            result: MirrorResult::Status(200),
            duration: None,
            content: Some(content(r#"{"rating":4}"#)),
        },
    );
    c.content().unwrap().settle();
    c
}

#[test]
fn content_metrics_parse() {
    let text = render(&Sources {
        comparison: compared_contents(),
        ..sources()
    });
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses");
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == "mirror_content_field_regression")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(s.labels.get("path"), Some("$.rating"), "{text}");
}

/// Metric families and their types, as `deploy/metrics.txt` lists them for users and
/// dashboards: changed on purpose only.
#[test]
fn exported_metrics_are_the_documented_ones() {
    let c = compared_contents();
    c.set_sampling(crate::compare::Sampling {
        share: 1.0,
        cpu_budget: Some(1.0),
        cpu_used: 0.1,
        live_path_used: 0.02,
        pressure: Some(crate::compare::PressureSeen {
            pressure: 0.01,
            threshold: 0.1,
            cgroups: 1,
            share: 1.0,
            node_idle: Some(0.5),
        }),
        backlog_share: 1.0,
    });
    let text = render(&Sources {
        comparison: c,
        ..sources()
    });
    let exported: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(str::to_string)
        .collect();
    let documented: Vec<String> = include_str!("../../../deploy/metrics.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert_eq!(
        exported, documented,
        "the exported metrics changed: update deploy/metrics.txt (and dashboards) on purpose"
    );
}

#[test]
fn every_stage_declares_each_familys_help_once() {
    use mirror_core::counters::{check_declared, Counters};
    for declared in [
        crate::reassembly::ReassemblyStats::DECLARED,
        crate::http::HttpStats::DECLARED,
        crate::capture::CaptureStats::DECLARED,
        crate::replay::ReplayStats::DECLARED,
        crate::record::RecordStats::DECLARED,
        crate::capture::tls::streams::TlsStats::DECLARED,
    ] {
        check_declared(declared).unwrap();
    }
    let text = render(&sources());
    let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
    assert!(helps
        .iter()
        .any(|l| l.starts_with("# HELP mirror_http_dropped ")));
    for help in helps {
        assert!(help.split(' ').count() > 3, "a family without help: {help}");
    }
}

#[test]
fn the_grafana_dashboard_only_uses_exported_metrics() {
    let text = render(&sources());
    let dashboard = include_str!("../../../deploy/grafana-dashboard.json");
    let re = regex::Regex::new(r"mirror_[a-z_]+").unwrap();
    let names: std::collections::BTreeSet<&str> =
        re.find_iter(dashboard).map(|m| m.as_str()).collect();
    assert!(names.len() >= 8);
    // `mirror_code` is a label; `mirror_agent` the dashboard's own uid.
    for name in names
        .iter()
        .filter(|n| !matches!(**n, "mirror_code" | "mirror_agent"))
    {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "dashboard uses {name}, which /metrics does not export"
        );
    }
}
