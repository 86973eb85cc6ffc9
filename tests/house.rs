//! The house rules a reader relies on: `src/` modules import one way (no cycle among them; a
//! file is a module, a folder counts as one), and the README and docs/ link only to files that
//! exist, that the README stays a newcomer's page and that docs/config.md lists every config key.

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

/// Every relative link `[text](target)` of the README and docs/*.md names a file that exists
/// (an anchor `#...` after it is checked against the target's headings).
#[test]
fn every_docs_link_resolves() {
    let root = root();
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            pages.push(e.path());
        }
    }
    assert!(pages.len() >= 5, "{pages:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in link_targets(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f.to_string(), Some(a.to_string())),
                None => (target.clone(), None),
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(&file)
            };
            if !path.exists() {
                broken.push(format!("{}: {target} (no such file)", page.display()));
                continue;
            }
            if let Some(a) = anchor {
                let body = std::fs::read_to_string(&path).unwrap_or_default();
                if !body.lines().any(|l| l.starts_with('#') && slug(l) == a) {
                    broken.push(format!("{}: {target} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The targets of `[text](target)` and `![alt](target)` links in `text`, outside code blocks.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || line.starts_with("    ") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(j) = after.find(')') else { break };
            out.push(after[..j].to_string());
            rest = &after[j..];
        }
    }
    out
}

/// A heading's anchor as GitHub makes it: lower case, spaces to '-', punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn the_link_checker_reads_links_and_anchors() {
    let t = "see [a](docs/a.md) and ![p](x.png#top)\n    [code](not/a/link)\n";
    assert_eq!(link_targets(t), ["docs/a.md", "x.png#top"]);
    assert_eq!(
        slug("## How the data is binarized"),
        "how-the-data-is-binarized"
    );
    assert_eq!(
        slug("# Moving through: `vae explore`"),
        "moving-through-vae-explore"
    );
}

/// The README is a newcomer's page: at most 300 lines, everything else in docs/.
#[test]
fn the_readme_stays_short() {
    let n = std::fs::read_to_string(root().join("README.md"))
        .unwrap()
        .lines()
        .count();
    assert!(n <= 300, "README.md has {n} lines; move detail into docs/");
}

/// Every key of the config struct (every section, every option set) is in docs/config.md.
#[test]
fn every_config_key_is_documented() {
    let mut cfg = vae::config::Config::default();
    // Options are left out of the TOML when unset: set each so that its key is listed.
    cfg.data.channels = Some(1);
    cfg.data.resize = Some([28, 28]);
    cfg.data.source = Some("hub:mnist".into());
    cfg.model.logvar_min = Some(-6.0);
    cfg.model.logvar_max = Some(2.0);
    let table: toml::Table = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
    let mut keys = Vec::new();
    for (k, v) in &table {
        match v {
            toml::Value::Table(t) => keys.extend(t.keys().map(|s| format!("{k}.{s}"))),
            _ => keys.push(k.clone()),
        }
    }
    assert!(keys.len() > 40, "{keys:?}");
    assert!(keys.contains(&"train.normalize_grad".to_string()));
    let doc = std::fs::read_to_string(root().join("docs/config.md")).unwrap();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "docs/config.md lacks {missing:?}");
}
