//! The top-level modules of mirror-core and mirror-agent depend on each other in one order,
//! without a cycle: a module uses only modules below it (segment ← exchange ← reassembly ←
//! http, in mirror-core, ← {replay, compare, record} ← pipeline, agent). Read from the
//! sources' `crate::` and `mirror_core::` paths, leaving out test code (`tests.rs` files,
//! `#[cfg(test)]` modules, and `testkit`, which only tests and fuzzers use). Needs no root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source folders of the two crates: mirror-core's stages, then the agent's.
fn srcs() -> [PathBuf; 2] {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"));
    [agent.join("../mirror-core/src"), agent.join("src")]
}

/// The top-level modules declared in the crates' lib.rs.
fn modules() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for src in srcs() {
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        all.extend(lib.lines().filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        }));
    }
    all
}

/// The library's source files other than lib.rs and main.rs, with their top-level module.
fn files(dir: &Path, top: Option<&str>, out: &mut Vec<(String, PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = top.map_or(name.clone(), str::to_string);
        if path.is_dir() {
            files(&path, Some(&module), out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && !(top.is_none() && (name == "lib" || name == "main"))
            && name != "tests"
        {
            out.push((module, path));
        }
    }
}

/// The source without its test modules: a `#[cfg(test)] mod x;` line goes, and a
/// `#[cfg(test)] mod x { … }` block goes to the end of the file, where test modules live.
fn without_tests(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let next = lines.get(i + 1).map_or("", |l| l.trim());
        let test_mod = lines[i].trim() == "#[cfg(test)]"
            && (next.starts_with("mod ") || next.starts_with("pub mod "));
        if test_mod {
            if next.ends_with(';') {
                i += 2;
                continue;
            }
            break;
        }
        kept.push(lines[i]);
        i += 1;
    }
    kept.join("\n")
}

/// Module → the modules it names as `crate::<module>`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let mut sources = Vec::new();
    for src in srcs() {
        files(&src, None, &mut sources);
    }
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in sources {
        if module == "testkit" {
            continue;
        }
        let text = without_tests(&std::fs::read_to_string(&path).unwrap());
        let entry = deps.entry(module.clone()).or_default();
        let paths = ["crate::", "mirror_core::"]
            .into_iter()
            .flat_map(|p| text.match_indices(p).map(move |(at, _)| at + p.len()));
        for at in paths {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != module && modules.contains(&name) {
                entry.insert(name);
            }
        }
    }
    deps
}

/// A cycle through `start`, if there is one: the modules in order, `start` first and last.
fn cycle_from(start: &str, deps: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn walk(
        at: &str,
        start: &str,
        deps: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in deps.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(next, start, deps, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(start, start, deps, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_form_no_cycle() {
    let deps = dependencies();
    let cycles: Vec<String> = deps
        .keys()
        .filter_map(|m| cycle_from(m, &deps))
        .map(|c| c.join(" → "))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules (move the shared types down, e.g. into \
         `exchange`):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_stage_order_holds() {
    let deps = dependencies();
    let below = |a: &str, b: &str| !deps.get(a).is_some_and(|d| d.contains(b));
    // Each stage may use those before it, never one after it.
    let order = ["segment", "exchange", "reassembly", "http"];
    for (i, lower) in order.iter().enumerate() {
        for upper in order[i + 1..].iter().chain(&[
            "replay", "compare", "record", "pipeline", "agent", "metrics",
        ]) {
            assert!(
                below(lower, upper),
                "{lower} uses {upper}: {:?}",
                deps[*lower]
            );
        }
    }
    assert!(
        deps["exchange"].iter().all(|d| d == "segment"),
        "{:?}",
        deps["exchange"]
    );
}

#[test]
fn a_cycle_is_found_and_test_code_is_not_read() {
    let deps: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
        ("d", &["a"][..]),
    ]
    .into_iter()
    .map(|(m, d)| (m.to_string(), d.iter().map(|s| s.to_string()).collect()))
    .collect();
    assert_eq!(cycle_from("a", &deps).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(cycle_from("d", &deps), None);
    let text = "use crate::x;\n#[cfg(test)]\nmod tests;\nfn f() {}\n#[cfg(test)]\nmod more {\n    use crate::y;\n}\n";
    assert_eq!(without_tests(text), "use crate::x;\nfn f() {}");
}
