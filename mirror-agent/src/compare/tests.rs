use super::*;
use crate::exchange::MirrorResult;
use std::time::Duration;

fn live(conn: u64, seq: u64, target: &str, status: u16, ms: u64) -> ResponseMeta {
    ResponseMeta {
        conn,
        server: "10.0.0.2:80".parse().unwrap(),
        request_seq: seq,
        method: "GET".into(),
        target: target.into(),
        status,
        grpc_status: None,
        request_last_ts: 1_000,
        response_first_ts: 1_000 + ms * 1_000_000,
    }
}

fn mirror(conn: u64, seq: u64, target: &str, result: MirrorResult, ms: u64) -> MirrorOutcome {
    MirrorOutcome {
        conn,
        seq,
        method: "GET".into(),
        target: target.into(),
        result,
        duration: Some(Duration::from_millis(ms)),
        content: None,
    }
}

#[test]
fn normalises_paths() {
    let r: Vec<RouteTemplate> = vec!["/api/{tenant}/books".parse().unwrap()];
    assert_eq!(
        endpoint_name("GET", "/api/books/2/reviews?page=3", &[]),
        "GET /api/books/{id}/reviews"
    );
    assert_eq!(
        endpoint_name("GET", "/u/123e4567-e89b-12d3-a456-426614174000/x", &[]),
        "GET /u/{id}/x"
    );
    assert_eq!(
        endpoint_name("PUT", "/blob/deadbeefdeadbeef00", &[]),
        "PUT /blob/{id}"
    );
    assert_eq!(
        endpoint_name("GET", "/v2/cafe", &[]),
        "GET /v2/cafe",
        "short words stay"
    );
    assert_eq!(
        endpoint_name("GET", "/api/acme/books?x", &r),
        "GET /api/{tenant}/books"
    );
    assert_eq!(
        endpoint_name("GET", "/api/acme/books/1", &r),
        "GET /api/acme/books/{id}"
    );
    assert_eq!(
        endpoint_name("GET", "http://h:80/a/7?q", &[]),
        "GET /a/{id}"
    );
    assert_eq!(endpoint_name("GET", "", &[]), "GET /");
}

#[test]
fn aggregates_match_a_reference() {
    let mut c = Comparator::new(CompareConfig::default());
    let durations: Vec<u64> = (1..=200).map(|i| (i * 7919) % 1000 + 1).collect();
    for (i, ms) in durations.iter().enumerate() {
        c.live(&live(1, i as u64, "/api/books/1", 200, *ms));
    }
    let r = c.report();
    let row = &r.rows[0];
    let mut sorted = durations.clone();
    sorted.sort();
    let avg = durations.iter().sum::<u64>() as f64 / durations.len() as f64;
    assert_eq!(row.count, 200);
    assert!((row.avg_ms - avg).abs() < 1e-9);
    // HdrHistogram with 3 significant digits: within 0.1%.
    let p50 = sorted[99] as f64;
    let p99 = sorted[197] as f64;
    assert!(
        (row.p50_ms - p50).abs() <= p50 * 0.002 + 0.001,
        "{} vs {p50}",
        row.p50_ms
    );
    assert!(
        (row.p99_ms - p99).abs() <= p99 * 0.002 + 0.001,
        "{} vs {p99}",
        row.p99_ms
    );
}

#[test]
fn untimed_mirror_answers_count_but_leave_durations_alone() {
    let mut c = Comparator::new(CompareConfig::default());
    for seq in 0..4 {
        c.live(&live(1, seq, "/a", 200, 300));
        let mut o = mirror(1, seq, "/a", MirrorResult::Status(200), 300);
        if seq > 0 {
            // Pipelined behind the first: its start is unknown.
            o.duration = None;
        }
        c.mirror(0, &o);
    }
    let r = c.report();
    let m = r.rows.iter().find(|x| x.side == Side::Mirror).unwrap();
    assert_eq!((m.count, m.timed), (4, 1));
    assert!((m.avg_ms - 300.0).abs() < 1e-9, "{}", m.avg_ms);
    assert_eq!(r.latency_ratios[0].pairs, 1);
    let h = c.histograms();
    let mh = h
        .iter()
        .find(|x| x.version == c.cfg.mirror_labels[0])
        .unwrap();
    assert_eq!(mh.count, 1);
    assert_eq!(mh.buckets.iter().map(|b| b.1).sum::<u64>(), 1);
    assert!(verdicts(&r)[0].starts_with("mirror matches live"));
}

#[test]
fn pairs_by_request_and_counts_mismatches_in_any_order() {
    let mut c = Comparator::new(CompareConfig {
        mirror_labels: vec!["V4MIR".into()],
        ..Default::default()
    });
    // Pipelined requests on one connection; outcomes arrive out of order; one mirror error.
    c.mirror(
        0,
        &mirror(9, 1, "/api/books/2/reviews", MirrorResult::Status(500), 30),
    );
    c.live(&live(9, 0, "/api/books/1/reviews", 200, 10));
    c.live(&live(9, 1, "/api/books/2/reviews", 200, 10));
    c.mirror(
        0,
        &mirror(9, 0, "/api/books/1/reviews", MirrorResult::Status(200), 20),
    );
    c.live(&live(9, 2, "/api/books/3/reviews", 200, 10));
    c.mirror(
        0,
        &mirror(9, 2, "/api/books/3/reviews", MirrorResult::Timeout, 2000),
    );
    let r = c.report();
    assert_eq!(
        r.mismatches,
        vec![
            Mismatch {
                name: "GET /api/books/{id}/reviews".into(),
                mirror: "V4MIR".into(),
                live_code: "200".into(),
                mirror_code: "500".into(),
                count: 1
            },
            Mismatch {
                name: "GET /api/books/{id}/reviews".into(),
                mirror: "V4MIR".into(),
                live_code: "200".into(),
                mirror_code: "timeout".into(),
                count: 1
            },
        ]
    );
    assert_eq!(r.latency_ratios[0].pairs, 3);
    assert!((r.latency_ratios[0].mean_ratio - (2.0 + 3.0 + 200.0) / 3.0).abs() < 1e-9);
    let codes: Vec<(&str, &str, u64)> = r
        .rows
        .iter()
        .map(|x| (x.version.as_str(), x.code.as_str(), x.count))
        .collect();
    assert_eq!(
        codes,
        [
            ("live", "200", 3),
            ("V4MIR", "200", 1),
            ("V4MIR", "500", 1),
            ("V4MIR", "timeout", 1)
        ]
    );
    let table = format_table(&r);
    assert!(
        table.contains("V4MIR") && table.contains("timeout") && table.contains("200 → 500"),
        "{table}"
    );
}

#[test]
fn verdicts_name_faults_and_slowness() {
    let mut c = Comparator::new(CompareConfig::default());
    for i in 0..10 {
        c.live(&live(1, i, "/api/books/2/reviews", 200, 15));
        let result = if i % 2 == 0 {
            MirrorResult::Status(500)
        } else {
            MirrorResult::Status(200)
        };
        c.mirror(0, &mirror(1, i, "/api/books/2/reviews", result, 1208));
        c.live(&live(2, i, "/api/books", 200, 5));
        c.mirror(0, &mirror(2, i, "/api/books", MirrorResult::Status(200), 6));
    }
    let v = verdicts(&c.report());
    assert_eq!(
        v,
        [
            "mirror fails on GET /api/books/{id}/reviews: 5× 500 where live answered 200",
            "mirror slower on GET /api/books/{id}/reviews: 1208 ms vs 15 ms live",
        ]
    );
    let mut same = Comparator::new(CompareConfig::default());
    let mut quick = Comparator::new(CompareConfig::default());
    quick.live(&live(1, 0, "/r", 200, 0));
    quick.mirror(0, &mirror(1, 0, "/r", MirrorResult::Status(200), 1200));
    assert_eq!(
        verdicts(&quick.report()),
        ["mirror slower on GET /r: 1200 ms vs 0.0 ms live"]
    );
    same.live(&live(1, 0, "/a", 200, 5));
    same.mirror(0, &mirror(1, 0, "/a", MirrorResult::Status(200), 6));
    assert_eq!(
        verdicts(&same.report()),
        ["mirror matches live: same status codes, similar durations on 1 endpoints"]
    );
}

#[test]
fn cardinality_cap_folds_into_other() {
    let mut c = Comparator::new(CompareConfig {
        max_endpoints: 3,
        ..Default::default()
    });
    for i in 0..50 {
        c.live(&live(1, i, &format!("/random/path-{i}/x"), 200, 1));
    }
    let r = c.report();
    let names: std::collections::HashSet<&str> = r.rows.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names.len(), 4);
    assert!(names.contains("other"));
    assert_eq!(r.other_endpoint_results, 47);
}

#[test]
fn pending_halves_are_bounded() {
    let mut c = Comparator::new(CompareConfig {
        max_pending: 10,
        ..Default::default()
    });
    for i in 0..1000 {
        c.live(&live(1, i, "/a", 200, 1)); // never mirrored (filtered, sampled out)
    }
    assert!(c.pending.len() <= 10);
    assert_eq!(c.report().unpaired_evicted, 990);
}

#[test]
fn each_mirror_is_paired_with_the_live_response_and_reported_apart() {
    let mut c = Comparator::new(CompareConfig {
        mirror_labels: vec!["cand".into(), "second".into(), "down".into()],
        max_pending: 100,
        ..Default::default()
    });
    for seq in 0..10 {
        // Outcomes before and after the live response, as replay and capture race.
        c.mirror(0, &mirror(1, seq, "/b/1", MirrorResult::Status(500), 30));
        c.live(&live(1, seq, "/b/1", 200, 10));
        c.mirror(1, &mirror(1, seq, "/b/1", MirrorResult::Status(200), 10));
        c.mirror(2, &mirror(1, seq, "/b/1", MirrorResult::Refused, 1));
    }
    let r = c.report();
    assert!(c.pending.len() == 0, "every request met all three mirrors");
    assert_eq!(r.mirrors, ["cand", "second", "down"]);
    let mism: Vec<(&str, &str, u64)> = r
        .mismatches
        .iter()
        .map(|m| (m.mirror.as_str(), m.mirror_code.as_str(), m.count))
        .collect();
    assert_eq!(mism, [("cand", "500", 10), ("down", "refused", 10)]);
    let ratios: Vec<(&str, u64)> = r
        .latency_ratios
        .iter()
        .map(|l| (l.mirror.as_str(), l.pairs))
        .collect();
    assert_eq!(ratios, [("cand", 10), ("second", 10), ("down", 10)]);
    let rows: Vec<(&str, u64)> = r
        .rows
        .iter()
        .map(|x| (x.version.as_str(), x.count))
        .collect();
    assert_eq!(
        rows,
        [("live", 10), ("cand", 10), ("second", 10), ("down", 10)]
    );
    assert_eq!(
        verdicts(&r),
        [
            "mirror cand fails on GET /b/{id}: 10× 500 where live answered 200",
            "mirror down fails on GET /b/{id}: 10× refused where live answered 200",
            "mirror second matches live: same status codes, similar durations on 1 endpoints",
        ]
    );
    let table = format_table(&r);
    assert!(table.contains("cand: 200 → 500"), "{table}");

    // A mirror that never answers leaves the others paired; its requests wait, bounded.
    let mut c = Comparator::new(CompareConfig {
        mirror_labels: vec!["a".into(), "silent".into()],
        max_pending: 10,
        ..Default::default()
    });
    for seq in 0..1000 {
        c.live(&live(2, seq, "/x", 200, 10));
        c.mirror(0, &mirror(2, seq, "/x", MirrorResult::Status(200), 10));
    }
    assert!(c.pending.len() <= 10);
    let r = c.report();
    assert_eq!(r.latency_ratios[0].pairs, 1000);
    assert_eq!(r.unpaired_evicted, 0, "each live response met mirror a");
}

mod contents {
    use super::*;
    use crate::compare::diffs::DiffConfig;
    use crate::exchange::content::{Body, Content};
    use crate::http::LiveContent;
    use std::sync::Arc;

    fn json(code: &str, v: serde_json::Value) -> Arc<Content> {
        Arc::new(Content::new(
            code.into(),
            vec![("content-type".into(), "application/json".into())],
            Body::Whole(bytes::Bytes::from(v.to_string())),
        ))
    }

    fn book(i: u64, rating: f64, price_field: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": i,
            "rating": rating,
            "servedAt": format!("2026-11-26T07:{i:02}:00Z"),
            "requestId": format!("{:x}", i * 7919 + rating as u64),
        });
        v[price_field] = serde_json::json!(9.5);
        v
    }

    fn comparator(mirrors: &[&str], secondary: Option<usize>, ignore: &[&str]) -> Comparison {
        Comparison::new(CompareConfig {
            mirror_labels: mirrors.iter().map(|m| m.to_string()).collect(),
            diffs: Some(DiffConfig {
                ignore: ignore.iter().map(|i| i.to_string()).collect(),
                secondary,
                max_pending: 1000,
                max_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap()
    }

    fn outcome(seq: u64, target: &str, content: Option<Arc<Content>>) -> MirrorOutcome {
        MirrorOutcome {
            content,
            ..mirror(3, seq, target, MirrorResult::Status(200), 5)
        }
    }

    fn live_content(seq: u64, target: &str, content: Arc<Content>) -> LiveContent {
        LiveContent {
            conn: 3,
            server: "10.0.0.2:80".parse().unwrap(),
            request_seq: seq,
            method: "GET".into(),
            target: target.into(),
            content,
        }
    }

    /// Live's answer to request `seq`: its status and timing, then its content.
    fn answer_live(c: &Comparison, seq: u64, target: &str, content: Arc<Content>) {
        c.live(&live(3, seq, target, 200, 5));
        c.live_content(&live_content(seq, target, content));
    }

    #[test]
    fn regressions_stand_out_from_the_noise_a_secondary_shows() {
        let c = comparator(&["cand", "second"], Some(1), &[]);
        for seq in 0..20 {
            let target = format!("/api/books/{seq}");
            // Every answer stamps its own time and id: live, the secondary and the candidate.
            c.mirror(
                0,
                &outcome(
                    seq,
                    &target,
                    Some(json("200", book(seq + 100, 4.0, "cost"))),
                ),
            );
            answer_live(&c, seq, &target, json("200", book(seq, 4.5, "price")));
            c.mirror(
                1,
                &outcome(
                    seq,
                    &target,
                    Some(json("200", book(seq + 200, 4.5, "price"))),
                ),
            );
            // An endpoint where only the noise differs.
            let t2 = format!("/api/authors/{seq}");
            answer_live(&c, seq + 1000, &t2, json("200", book(seq, 1.0, "price")));
            c.mirror(
                0,
                &outcome(
                    seq + 1000,
                    &t2,
                    Some(json("200", book(seq + 1, 1.0, "price"))),
                ),
            );
            c.mirror(
                1,
                &outcome(
                    seq + 1000,
                    &t2,
                    Some(json("200", book(seq + 2, 1.0, "price"))),
                ),
            );
        }
        c.content().unwrap().settle();
        let r = c.report();
        let row = |name: &str, mirror: &str| {
            r.content
                .iter()
                .find(|x| x.name == name && x.mirror == mirror)
                .unwrap()
                .clone()
        };
        let cand = row("GET /api/books/{id}", "cand");
        assert_eq!((cand.compared, cand.differing), (20, 20));
        let regressions: Vec<&str> = cand
            .fields
            .iter()
            .filter(|f| f.regression)
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(regressions, ["$.cost", "$.price", "$.rating"]);
        for noise in ["$.servedAt", "$.requestId", "$.id"] {
            let f = cand.fields.iter().find(|f| f.path == noise).unwrap();
            assert_eq!(
                (f.rate, f.noise_rate, f.regression),
                (1.0, 1.0, false),
                "{noise}"
            );
        }
        let rating = cand.fields.iter().find(|f| f.path == "$.rating").unwrap();
        assert_eq!(
            (
                rating.live_example.as_deref(),
                rating.mirror_example.as_deref()
            ),
            (Some("4.5"), Some("4.0"))
        );
        assert!(row("GET /api/books/{id}", "second").secondary);
        assert!(row("GET /api/authors/{id}", "cand")
            .fields
            .iter()
            .all(|f| !f.regression));
        assert_eq!(
            verdicts(&r),
            [
                "mirror cand differs on GET /api/books/{id}: $.cost added (100%), $.price missing (100%), $.rating (100% vs 0% noise)",
                "mirror second matches live: same status codes, similar durations on 2 endpoints",
            ]
        );
        assert!(
            c.content().unwrap().waiting().0 == 0,
            "nothing left waiting"
        );
        let table = format_table(&r);
        assert!(
            table.contains("$.rating  100% (noise 0%)  4.5 → 4.0  REGRESSION"),
            "{table}"
        );
    }

    #[test]
    fn without_a_secondary_ignored_paths_and_learned_noise_keep_quiet() {
        let c = comparator(&["cand"], None, &["$.servedAt"]);
        for seq in 0..10 {
            // The same request twice: live's two answers differ in their request id.
            let live = book(seq, 4.5, "price");
            answer_live(&c, seq, "/api/books/1", json("200", live));
            c.mirror(
                0,
                &outcome(
                    seq,
                    "/api/books/1",
                    Some(json("200", book(seq + 50, 4.5, "price"))),
                ),
            );
        }
        c.content().unwrap().settle();
        let r = c.report();
        let cand = &r.content[0];
        assert!(
            cand.fields.iter().all(|f| f.path != "$.servedAt"),
            "ignored"
        );
        let id = cand
            .fields
            .iter()
            .find(|f| f.path == "$.requestId")
            .unwrap();
        assert!(id.noise_rate > 0.5 && !id.regression, "{id:?}");
        assert!(
            verdicts(&r)[0].starts_with("mirror matches live"),
            "{:?}",
            verdicts(&r)
        );
    }

    #[test]
    fn failed_mirrors_and_missing_live_bodies_are_counted_and_memory_is_bounded() {
        let c = Comparison::new(CompareConfig {
            mirror_labels: vec!["cand".into()],
            diffs: Some(DiffConfig {
                max_pending: 1000,
                max_bytes: 4096,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let big = json("200", serde_json::json!({ "pad": "x".repeat(1000) }));
        for seq in 0..100 {
            // Mirror answers whose live bodies never come (not captured whole).
            c.mirror(0, &outcome(seq, "/a", Some(Arc::clone(&big))));
        }
        let mut failed = mirror(3, 500, "/a", MirrorResult::Timeout, 5);
        failed.content = None;
        c.mirror(0, &failed);
        c.content().unwrap().settle();
        let (_, held) = c.content().unwrap().waiting();
        assert!(held <= 4096, "{held}");
        let n = c.report().content_not_compared.unwrap();
        assert_eq!(n.mirror_failed, 1);
        // Passed over at the hand-off (the thread behind), or waiting beyond the bytes.
        assert!(n.no_live + n.memory + n.busy >= 96, "{n:?}");
    }
}

#[test]
fn result_codes_are_bounded_whatever_a_peer_sends() {
    let mut c = Comparator::new(CompareConfig {
        mirror_labels: vec!["M".into()],
        max_series: 100_000,
        ..Default::default()
    });
    // A gRPC peer can answer any `grpc-status`; every one is a distinct code.
    for g in 0..(MAX_CODES as u32 + 500) {
        let mut l = live(1, u64::from(g), "/rpc", 200, 1);
        l.grpc_status = Some(g);
        c.live(&l);
        c.mirror(
            0,
            &mirror(1, u64::from(g), "/rpc", MirrorResult::Grpc(200, g), 1),
        );
    }
    assert!(
        c.codes.len() <= MAX_CODES + 1,
        "{} codes kept",
        c.codes.len()
    );
    let r = c.report();
    let count = |code: &str| -> u64 {
        r.rows
            .iter()
            .filter(|row| row.code == code)
            .map(|row| row.count)
            .sum()
    };
    // The first codes keep their names, from the cache as from the first sight.
    assert_eq!(count("OK"), 2);
    assert_eq!(count("grpc-100"), 2);
    assert!(
        count("other") >= 2 * 500,
        "the codes over the cap fold into `other`"
    );
    // HTTP statuses and error codes keep their names past the cap, seen once or again.
    c.live(&live(2, 0, "/a", 503, 1));
    c.live(&live(2, 1, "/a", 503, 1));
    c.mirror(0, &mirror(2, 0, "/a", MirrorResult::Timeout, 1));
    c.mirror(0, &mirror(2, 1, "/a", MirrorResult::Timeout, 1));
    let r = c.report();
    let n = |code: &str| -> u64 {
        r.rows
            .iter()
            .filter(|row| row.code == code && row.name == "GET /a")
            .map(|row| row.count)
            .sum()
    };
    assert_eq!((n("503"), n("timeout")), (2, 2));
}

mod verdicts {
    use super::*;

    /// `n` requests to `target`: live answers `live_code`, the mirror `result`, both in 5 ms.
    fn judged(pairs: &[(&str, u16, MirrorResult, u64)]) -> Report {
        let mut c = Comparator::new(CompareConfig::default());
        let mut seq = 0;
        for (target, live_code, result, n) in pairs {
            for _ in 0..*n {
                seq += 1;
                c.live(&live(1, seq, target, *live_code, 5));
                c.mirror(0, &mirror(1, seq, target, *result, 5));
            }
        }
        let mut r = c.report();
        r.verdicts = judge(&r);
        r
    }

    fn kinds(r: &Report) -> Vec<(&str, VerdictKind)> {
        r.verdicts
            .iter()
            .map(|v| (v.name.as_str(), v.verdict))
            .collect()
    }

    #[test]
    fn any_status_difference_is_named_in_either_direction() {
        for (live_code, mirror_code) in [(200, 404), (404, 200), (201, 200), (302, 200), (200, 401)]
        {
            let r = judged(&[
                (
                    "/missing/1",
                    live_code,
                    MirrorResult::Status(mirror_code),
                    20,
                ),
                ("/ok", 200, MirrorResult::Status(200), 3),
            ]);
            assert_eq!(
                kinds(&r),
                [
                    ("GET /missing/{id}", VerdictKind::Differs),
                    ("GET /ok", VerdictKind::Match)
                ],
                "{live_code} → {mirror_code}"
            );
            let v = &r.verdicts[0];
            assert_eq!((v.paired, v.mismatched), (20, 20));
            assert_eq!(
                verdicts(&r),
                [format!(
                    "mirror differs on GET /missing/{{id}}: {mirror_code} where live answered {live_code} ×20 of 20 paired"
                )],
                "no \"matches\" line while an endpoint differs"
            );
        }
    }

    #[test]
    fn grpc_statuses_are_judged_by_name() {
        let mut c = Comparator::new(CompareConfig::default());
        for seq in 0..4 {
            let mut l = live(1, seq, "/books.Books/Get", 200, 5);
            l.grpc_status = Some(0);
            l.method = "POST".into();
            c.live(&l);
            // NOT_FOUND where live said OK, then INTERNAL: a difference, then a failure.
            let g = if seq < 3 { 5 } else { 13 };
            let mut o = mirror(1, seq, "/books.Books/Get", MirrorResult::Grpc(200, g), 5);
            o.method = "POST".into();
            c.mirror(0, &o);
        }
        let r = c.report();
        let v = judge(&r);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].verdict, VerdictKind::Fails, "the worst finding wins");
        assert_eq!(
            verdicts(&r),
            [
                "mirror fails on POST /books.Books/Get: 1× INTERNAL where live answered OK",
                "mirror differs on POST /books.Books/Get: NOT_FOUND where live answered OK ×3 of 4 paired (75%)",
            ]
        );
    }

    #[test]
    fn a_rare_difference_is_shown_with_its_share_and_live_flapping_named() {
        // Live flapped once to 404 on an endpoint it otherwise answers 200; the mirror said 200.
        let r = judged(&[
            ("/books/1", 200, MirrorResult::Status(200), 999),
            ("/books/2", 404, MirrorResult::Status(200), 1),
        ]);
        assert_eq!(kinds(&r), [("GET /books/{id}", VerdictKind::Differs)]);
        assert_eq!(
            verdicts(&r),
            ["mirror differs on GET /books/{id}: 200 where live answered 404 ×1 of 1000 paired (0.100%); live itself answered 200 ×999 here, so live may flap"]
        );
    }

    #[test]
    fn failures_keep_their_wording_and_both_failing_differently_differs() {
        let r = judged(&[
            ("/a", 200, MirrorResult::Status(503), 2),
            ("/b", 200, MirrorResult::Timeout, 1),
            ("/c", 500, MirrorResult::Status(503), 1),
        ]);
        assert_eq!(
            kinds(&r),
            [
                ("GET /a", VerdictKind::Fails),
                ("GET /b", VerdictKind::Fails),
                ("GET /c", VerdictKind::Differs)
            ]
        );
        assert_eq!(
            verdicts(&r)[1],
            "mirror fails on GET /b: 1× timeout where live answered 200"
        );
    }

    #[test]
    fn report_json_carries_a_verdict_per_endpoint_and_mirror() {
        let r = judged(&[
            ("/gone", 200, MirrorResult::Status(404), 2),
            ("/ok", 200, MirrorResult::Status(200), 2),
        ]);
        let json = serde_json::to_value(&r).unwrap();
        let v = &json["verdicts"];
        assert_eq!(v[0]["name"], "GET /gone");
        assert_eq!(v[0]["verdict"], "differs");
        assert_eq!(v[0]["mismatched"], 2);
        assert_eq!(v[0]["findings"][0]["kind"], "differs");
        assert_eq!(v[1]["verdict"], "match");
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back.verdicts, r.verdicts);
    }

    #[test]
    fn nothing_paired_claims_no_match() {
        let mut c = Comparator::new(CompareConfig::default());
        c.mirror(0, &mirror(1, 0, "/a", MirrorResult::Status(200), 5));
        let r = c.report();
        assert!(judge(&r).is_empty());
        assert_eq!(
            verdicts(&r),
            ["mirror: nothing to judge yet, no request paired with its live response"]
        );
    }
}

/// `report --agent` must read any report an agent serves: one asked for in the agent's first
/// second, before the node's idle share was measured, failed with "invalid type: null,
/// expected f64" (NaN is written as null).
#[test]
fn a_report_from_before_the_first_idle_sample_reads_back() {
    let mut r: Report = serde_json::from_str(
        r#"{"rows":[],"mismatches":[],"latency_ratios":[],
            "other_endpoint_results":0,"unpaired_evicted":0}"#,
    )
    .unwrap();
    r.sampling = Some(Sampling {
        share: 1.0,
        cpu_budget: None,
        cpu_used: 0.1,
        live_path_used: 0.0,
        pressure: Some(PressureSeen {
            pressure: 0.0,
            threshold: 0.1,
            cgroups: 1,
            share: 1.0,
            node_idle: None,
        }),
        backlog_share: 1.0,
    });
    let text = serde_json::to_string_pretty(&r).unwrap();
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back.sampling, r.sampling);
    assert!(format_table(&back).contains("idle share not measured yet"));
}
