//! The crate map in ARCHITECTURE.md is the rule: every workspace crate is
//! listed there with the crates it may depend on, and a crate that gains a
//! dependency the map does not allow fails this test (so the map and the
//! code cannot drift apart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `crate dir → allowed crate dirs` (`None`: may depend on anything), from
/// the table under "## The crate map".
fn the_map() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = text
        .split("## The crate map")
        .nth(1)
        .expect("ARCHITECTURE.md has a section `## The crate map`");
    let mut map = BTreeMap::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `crate` | job | may depend on |
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1]
            .trim_matches('`')
            .trim_start_matches("crates/")
            .to_string();
        let allowed = match cells[3] {
            "—" | "-" | "" => Some(BTreeSet::new()),
            "everything" => None,
            list => Some(
                list.split(',')
                    .map(|s| s.trim().trim_matches('`').to_string())
                    .collect(),
            ),
        };
        map.insert(name, allowed);
    }
    map
}

/// `crate dir → (package name, its [dependencies] on workspace crates)`.
fn the_workspace() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut by_dir = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crates")).expect("crates/") {
        let dir = entry.expect("entry").path();
        let manifest = dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let doc: toml::Table = toml::from_str(&text).expect("a valid Cargo.toml");
        let name = doc["package"]["name"]
            .as_str()
            .expect("package.name")
            .to_string();
        let deps: BTreeSet<String> = doc
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let dir_name = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        by_dir.insert(dir_name, (name, deps));
    }
    by_dir
}

#[test]
fn crates_depend_only_on_what_the_crate_map_allows() {
    let map = the_map();
    let ws = the_workspace();
    assert!(ws.len() >= 10, "found the workspace crates: {ws:?}");
    let dir_of: BTreeMap<&str, &str> = ws
        .iter()
        .map(|(dir, (name, _))| (name.as_str(), dir.as_str()))
        .collect();
    let mut faults = Vec::new();
    for listed in map.keys() {
        if !ws.contains_key(listed) {
            faults.push(format!("the map lists `{listed}`, which is not a crate"));
        }
    }
    for (dir, (_, deps)) in &ws {
        let Some(allowed) = map.get(dir) else {
            faults.push(format!("`{dir}` is missing from the crate map"));
            continue;
        };
        let Some(allowed) = allowed else { continue };
        for dep in deps {
            if let Some(dep_dir) = dir_of.get(dep.as_str()) {
                if !allowed.contains(*dep_dir) {
                    faults.push(format!(
                        "`{dir}` depends on `{dep_dir}`, which the crate map does not allow \
                         (allowed: {allowed:?}); change the design or the map in ARCHITECTURE.md"
                    ));
                }
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

/// The map itself points one way: no crate may (transitively) depend on
/// itself.
#[test]
fn the_crate_map_has_no_cycles() {
    let map = the_map();
    fn visit(
        n: &str,
        map: &BTreeMap<String, Option<BTreeSet<String>>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if path.iter().any(|p| p == n) {
            let mut cycle = path.clone();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        path.push(n.to_string());
        if let Some(Some(next)) = map.get(n) {
            for m in next {
                if let Some(c) = visit(m, map, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        None
    }
    for n in map.keys() {
        if let Some(cycle) = visit(n, &map, &mut Vec::new()) {
            panic!("the crate map has a cycle: {}", cycle.join(" → "));
        }
    }
}
