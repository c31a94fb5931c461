use super::*;

const TWO: &str = r#"
apiVersion: mirror-agent.dev/v1alpha1
kind: TrafficMirror
metadata: {name: reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews, tier: api}}
  ports: [9080]
  candidates:
  - name: v3
    url: http://reviews-v3:9080
    samplePercent: 12.5
    setHeaders: {x-env: staging}
    removeHeaders: [cookie]
    secretHeaders: ["Authorization: Bearer @/run/secrets/token"]
    rewrite: {path: {regex: "^/reviews/", replacement: "/r/"}, removeQuery: [session]}
  - {name: v1-again, url: "http://reviews-v1b:9080", secondary: true}
  requests: {methods: [get, post], path: "^/reviews/", headers: {x-tenant: "^(7|9)$"}}
  writes: {default: "only:v3", routes: ["^/reviews/delete=skip"]}
  compare: {liveLabel: v1, ignore: [$.at], arrayKeys: {$.reviews: id}}
---
apiVersion: mirror-agent.dev/v1alpha1
kind: TrafficMirror
metadata: {name: books}
spec:
  ports: [8080]
  candidates: [{name: next, url: "http://127.0.0.1:9000"}]
"#;

#[test]
fn a_file_of_two_objects_reads_and_checks() {
    let objects = from_yaml("mirrors.yaml", TWO).unwrap();
    assert_eq!(
        objects.keys().collect::<Vec<_>>(),
        ["default/books", "shop/reviews"]
    );
    let m = Mirroring::check("shop/reviews", &objects["shop/reviews"].spec).unwrap();
    assert_eq!(m.namespace, "shop");
    assert_eq!(m.labels, "app=reviews,tier=api");
    assert_eq!(m.ports, [9080]);
    assert_eq!(m.methods, ["GET", "POST"]);
    assert_eq!(m.headers[0].0, "x-tenant");
    assert!(m.headers[0].1.is_match("9") && !m.headers[0].1.is_match("79"));
    assert_eq!(m.live_label, "v1");
    assert_eq!(m.array_keys, [("$.reviews".to_string(), "id".to_string())]);
    assert_eq!(m.candidates[0].sample_ppm, 125_000);
    assert_eq!(
        m.candidates[0].secret_headers[0].path.to_str(),
        Some("/run/secrets/token")
    );
    assert!(m.candidates[1].secondary);
    assert_eq!(
        m.candidates[0].rewrite.apply("/reviews/1?session=x&a=1"),
        "/r/1?a=1"
    );
    assert!(m.writes.for_mirror("v3").allows("POST", "/reviews/1"));
    assert!(!m.writes.for_mirror("v1-again").allows("POST", "/reviews/1"));
    assert!(!m.writes.for_mirror("v3").allows("POST", "/reviews/delete"));
    let books = Mirroring::check("default/books", &objects["default/books"].spec).unwrap();
    assert!(
        !books.selects_pods(),
        "no selector: whatever the agent is attached to"
    );
}

fn spec_with(edit: impl FnOnce(&mut TrafficMirrorSpec)) -> Result<Mirroring, SpecError> {
    let mut spec = from_yaml("f", TWO).unwrap()["default/books"].spec.clone();
    edit(&mut spec);
    Mirroring::check("default/books", &spec)
}

#[test]
fn each_bad_field_is_named() {
    let field = |r: Result<Mirroring, SpecError>| match r.unwrap_err() {
        SpecError::Invalid { what, .. } => what,
        e => e.to_string(),
    };
    assert_eq!(field(spec_with(|s| s.ports.clear())), "spec.ports");
    assert_eq!(
        field(spec_with(|s| s.candidates.clear())),
        "spec.candidates"
    );
    assert_eq!(
        field(spec_with(|s| s.candidates[0].url = "ftp://x".into())),
        "spec.candidates[0].url"
    );
    assert_eq!(
        field(spec_with(|s| s.candidates[0].sample_percent = Some(101.0))),
        "spec.candidates[0].samplePercent"
    );
    assert_eq!(
        field(spec_with(|s| s.candidates[0].host = Some("live".into()))),
        "spec.candidates[0].host"
    );
    assert_eq!(
        field(spec_with(|s| {
            s.candidates[0]
                .set_headers
                .insert("bad name".into(), "x".into());
        })),
        "spec.candidates[0].setHeaders"
    );
    assert_eq!(
        field(spec_with(|s| s.requests = Some(RequestMatch {
            path: Some("(".into()),
            ..RequestMatch::default()
        }))),
        "spec.requests.path"
    );
    assert_eq!(
        field(spec_with(|s| s.requests = Some(RequestMatch {
            headers: [("x-tenant".to_string(), "[".to_string())].into(),
            ..RequestMatch::default()
        }))),
        "spec.requests.headers.x-tenant"
    );
    assert_eq!(
        field(spec_with(|s| s.writes = Some(Writes {
            default: Some("only:nobody".into()),
            routes: vec![]
        }))),
        "spec.writes"
    );
    assert_eq!(
        field(spec_with(|s| {
            s.candidates[0].rewrite = Some(Rewrite {
                path: Some(PathRewrite {
                    regex: "(".into(),
                    replacement: "/".into(),
                }),
                ..Rewrite::default()
            })
        })),
        "spec.candidates[0].rewrite.path.regex"
    );
    let twice = spec_with(|s| s.candidates.push(s.candidates[0].clone())).unwrap_err();
    assert_eq!(twice, SpecError::DuplicateCandidate("next".into()));
}

#[test]
fn a_file_with_something_else_in_it_is_refused_with_the_document_named() {
    let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
    let e = from_yaml("m.yaml", other).unwrap_err().to_string();
    assert!(
        e.contains("m.yaml") && e.contains("document 1") && e.contains("ConfigMap"),
        "{e}"
    );
    let twice = format!("{TWO}---\n{}", TWO.split("---").nth(1).unwrap());
    let e = from_yaml("m.yaml", &twice).unwrap_err().to_string();
    assert!(e.contains("default/books is declared twice"), "{e}");
    let broken = "kind: TrafficMirror\nmetadata: {name: x}\nspec: {ports: [80], candidates: 3}\n";
    let e = from_yaml("m.yaml", broken).unwrap_err().to_string();
    assert!(e.contains("candidates"), "{e}");
}

#[test]
fn the_crd_merges_node_entries_and_shows_the_columns() {
    let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    assert_eq!(crd["metadata"]["name"], "trafficmirrors.mirror-agent.dev");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let nodes =
        &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"];
    assert_eq!(nodes["x-kubernetes-list-type"], "map");
    assert_eq!(nodes["x-kubernetes-list-map-keys"][0], "node");
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        ["Ports", "Nodes", "Pods", "Mirrored", "Verdict", "Age"]
    );
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["ports"]["minItems"], 1);
    assert_eq!(
        spec["required"],
        serde_json::json!(["candidates", "ports"]),
        "the API server refuses an object without ports or candidates"
    );
}

/// `deploy/trafficmirror-crd.yaml` is what the types generate: regenerate it with
/// `UPDATE_CRD=1 cargo test -p mirror-agent --lib crd_file`.
#[test]
fn crd_file_in_deploy_is_the_generated_one() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/trafficmirror-crd.yaml");
    let generated = format!(
        "# Generated from mirror-agent/src/mirrorings/spec.rs; a test keeps it equal.\n{}",
        crd_yaml()
    );
    if std::env::var_os("UPDATE_CRD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is not the generated CRD: run UPDATE_CRD=1 cargo test -p mirror-agent --lib crd_file",
        path.display()
    );
}

#[test]
fn the_examples_in_deploy_read_and_check() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for (file, n) in [
        ("trafficmirror-example.yaml", 2),
        ("lab/bookservice-trafficmirror.yaml", 1),
    ] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let objects = from_yaml(file, &text).unwrap();
        assert_eq!(objects.len(), n, "{file}");
        for (key, tm) in &objects {
            Mirroring::check(key, &tm.spec).unwrap_or_else(|e| panic!("{file}: {key}: {e}"));
        }
    }
}
