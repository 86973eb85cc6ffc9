//! The house rules a reader relies on: `src/` modules import one way (no cycle among them; a
//! file is a module, a folder counts as one), and the README and docs/ link only to files that
//! exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The identifiers after `crate::` in `text`, including each name of a `crate::{a, b::c}` group.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        } else {
            out.insert(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

/// The module graph of `src/`: module -> the modules it names through `crate::` (or `super::`
/// from a top-level file, which is the crate root).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?.to_string();
        if rel.components().count() == 1 {
            if first == "main.rs" || first == "lib.rs" {
                return None;
            }
            Some(first.trim_end_matches(".rs").to_string())
        } else {
            Some(first)
        }
    };
    let names: BTreeSet<String> = files.iter().filter_map(|p| module_of(p)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &files {
        let Some(m) = module_of(p) else { continue };
        let text = std::fs::read_to_string(p).unwrap();
        let mut refs = crate_refs(&text);
        if p.parent() == Some(src.as_path()) {
            refs.extend(crate_refs(&text.replace("super::", "crate::")));
        }
        let deps = g.entry(m.clone()).or_default();
        for r in refs {
            if names.contains(&r) && r != m {
                deps.insert(r);
            }
        }
    }
    g
}

/// A cycle through `start`, if any: depth-first search for a path back to it.
fn cycle_through(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_checker_finds_references_and_cycles() {
    let refs = crate_refs("use crate::{config::Config, data};\nlet x = crate::eval::normal();");
    assert_eq!(
        refs,
        ["config", "data", "eval"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycle_through(&g, "a").unwrap(), ["a", "b", "c", "a"]);
    g.get_mut("c").unwrap().clear();
    assert!(cycle_through(&g, "a").is_none());
}

#[test]
fn modules_import_one_way() {
    let g = module_graph();
    assert!(g.len() >= 15, "found only {:?}", g.keys());
    // The bottom of the house imports nothing of the crate.
    for bottom in ["device", "loss", "optim", "interrupt"] {
        assert!(g[bottom].is_empty(), "{bottom} imports {:?}", g[bottom]);
    }
    let cycles: Vec<String> = g
        .keys()
        .filter_map(|m| cycle_through(&g, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
