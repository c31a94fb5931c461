use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn series(instance: &str, extra: &[(&str, &str)], n: f64) -> (Labels, f64) {
    let mut l = labels(&[("instance", instance), ("job", "mirror-agent")]);
    l.extend(labels(extra));
    (l, n)
}

fn query(mirroring: Option<&str>) -> FleetQuery {
    FleetQuery {
        selector: String::new(),
        mirroring: mirroring.map(str::to_string),
        window: Duration::from_secs(600),
    }
}

#[test]
fn the_only_mirroring_is_taken_and_several_must_be_named() {
    let one = vec![series("a", &[], 1.0), series("b", &[], 2.0)];
    assert_eq!(pick_mirroring(&one, &query(None), "600s").unwrap(), "");
    let two = vec![
        series("a", &[("mirroring", "shop/books")], 1.0),
        series("b", &[], 2.0),
    ];
    let err = pick_mirroring(&two, &query(None), "600s").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the series come from 2 mirrorings (the agents' own --mirror flags, shop/books): name one with --mirroring"
    );
    assert_eq!(
        pick_mirroring(&two, &query(Some("shop/books")), "600s").unwrap(),
        "shop/books"
    );
    let err = pick_mirroring(&two, &query(Some("shop/x")), "600s").unwrap_err();
    assert!(
        err.to_string().contains("no series of mirroring shop/x"),
        "{err}"
    );
}

#[test]
fn agents_with_other_labels_or_buckets_are_refused_by_name() {
    let request = |i| {
        series(
            i,
            &[("endpoint", "e"), ("version", "v"), ("code", "200")],
            1.0,
        )
    };
    let bucket = |i, le| series(i, &[("le", le)], 1.0);
    let requests = vec![request("a"), request("b")];
    let same = vec![bucket("a", "0.1"), bucket("b", "0.1")];
    assert!(check_same_series(&requests, &same).is_ok());
    let other = vec![bucket("a", "0.1"), bucket("b", "0.1"), bucket("b", "0.5")];
    let err = check_same_series(&requests, &other)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a label requests by code/endpoint/version and bucket durations by 1 bounds"),
        "{err}"
    );
    assert!(
        err.contains("b label requests by code/endpoint/version and bucket durations by 2 bounds"),
        "{err}"
    );
    let older = vec![
        request("a"),
        series("b", &[("endpoint", "e"), ("version", "v")], 1.0),
    ];
    assert!(check_same_series(&older, &same).is_err());
}

#[test]
fn rows_sum_the_agents_and_take_quantiles_from_the_summed_buckets() {
    let key = [("endpoint", "GET /a"), ("version", "V1"), ("code", "200")];
    let requests = vec![series("a", &key, 30.0), series("b", &key, 10.0)];
    let with_le = |i, le, n| {
        let mut k = key.to_vec();
        k.push(("le", le));
        series(i, &k, n)
    };
    // a: 30 under 1 ms; b: 10 between 1 and 2.5 ms (cumulative buckets).
    let buckets = vec![
        with_le("a", "0.001", 30.0),
        with_le("a", "0.0025", 30.0),
        with_le("a", "+Inf", 30.0),
        with_le("b", "0.001", 0.0),
        with_le("b", "0.0025", 10.0),
        with_le("b", "+Inf", 10.0),
    ];
    let k: Vec<String> = key.iter().map(|(_, v)| v.to_string()).collect();
    let sums = BTreeMap::from([(k.clone(), 0.04)]);
    let counts = BTreeMap::from([(k, 40.0)]);
    let active = sum(&requests, &["endpoint", "version", "code"]);
    let hists = histograms(&active, &buckets, &sums, &counts);
    assert_eq!(hists.len(), 1);
    assert_eq!(
        hists[0].buckets,
        vec![(0.001, 30), (0.0025, 10), (f64::INFINITY, 0)]
    );
    let rows = rows(
        &[],
        &sum(&requests, &["endpoint", "version", "code"]),
        &hists,
    );
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!((r.count, r.timed, r.side), (40, 40, Side::Live));
    assert!((r.avg_ms - 1.0).abs() < 1e-9);
    // Rank 20 of 40: two thirds into 0–1 ms; rank 39.6: 96% into 1–2.5 ms.
    assert!((r.p50_ms - 2.0 / 3.0).abs() < 1e-9, "{}", r.p50_ms);
    assert!((r.p99_ms - 2.44).abs() < 1e-9, "{}", r.p99_ms);
}

#[test]
fn a_version_that_paired_is_a_mirror_and_idle_series_are_left_out() {
    let paired = BTreeMap::from([(vec!["GET /a".to_string(), "V3".to_string()], 4.0)]);
    let mirrors = mirrors(&paired, &BTreeMap::new(), &[]);
    assert_eq!(mirrors, ["V3"]);
    let requests = BTreeMap::from([
        (vec!["GET /a".into(), "V1".into(), "200".into()], 4.0),
        (vec!["GET /a".into(), "V3".into(), "200".into()], 4.0),
        (vec!["GET /b".into(), "V1".into(), "200".into()], 0.0),
    ]);
    let rows = rows(&mirrors, &requests, &[]);
    let sides: Vec<(&str, Side)> = rows.iter().map(|r| (r.version.as_str(), r.side)).collect();
    assert_eq!(sides, [("V1", Side::Live), ("V3", Side::Mirror)]);
}
