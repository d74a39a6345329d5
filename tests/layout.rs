//! The dependency rule of `src/lib.rs`, checked on the source itself: leaf modules import
//! nothing of the crate, sinks never import the store, only `app` and `main` import the
//! server, and no two modules import each other however indirectly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that import nothing of the crate: the vocabulary every layer shares.
const LEAVES: [&str; 10] = [
    "protocol",
    "event",
    "signature",
    "backoff",
    "metrics",
    "net",
    "body",
    "feed",
    "history",
    "config::error",
];

/// The `.rs` files under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `src/store/sqlite/writer.rs` -> `["store", "sqlite", "writer"]`; `mod.rs` and
/// `lib.rs` stand for their folder.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments (doc links name paths that are no imports) and
/// without its unit tests (tests may use anything).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// The first two segments of every path in `rest`, which follows `crate::`: a plain path
/// (`config::error::Invalid`) or a group (`{config::Config, event::{Event, Source}}`).
fn paths(rest: &str, out: &mut BTreeSet<(String, String)>) {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut item_start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    paths(&group[item_start..i], out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    paths(&group[item_start..i], out);
                    item_start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let (first, after) = ident(rest);
    if first.is_empty() || first == "self" {
        return;
    }
    let second = after
        .strip_prefix("::")
        .map(|s| ident(s.trim_start()).0)
        .unwrap_or_default();
    out.insert((first.to_owned(), second.to_owned()));
}

/// Every (module, second segment) a piece of code names through `crate::` (or through
/// the library's name, for the binary).
fn imports(code: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for prefix in ["crate::", "vyora_router::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix) {
            let start = from + at;
            let preceded = code[..start]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !preceded {
                paths(&code[start + prefix.len()..], &mut out);
            }
            from = start + prefix.len();
        }
    }
    out
}

/// Leaves inside a larger module (`config::error`) are nodes of their own: importing the
/// vocabulary of `config` is not importing `config`.
fn node(first: &str, second: &str) -> String {
    let path = format!("{first}::{second}");
    if LEAVES.contains(&path.as_str()) {
        path
    } else {
        first.to_owned()
    }
}

/// Top-level module -> the top-level modules it imports; and the same for every
/// submodule, as full paths, for the leaf rule.
struct Graph {
    top: BTreeMap<String, BTreeSet<String>>,
    by_module: BTreeMap<String, BTreeSet<(String, String)>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut by_module: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for file in sources(&src) {
        let module = module_of(&src, &file);
        let Some(first) = module.first() else {
            continue; // lib.rs: the module map, not an importer
        };
        let first = node(first, module.get(1).map_or("", String::as_str));
        if module.last().is_some_and(|m| m == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        let found = imports(&code(&text));
        let edges = top.entry(first.clone()).or_default();
        for (imported, second) in &found {
            let imported = node(imported, second);
            if imported != first {
                edges.insert(imported);
            }
        }
        by_module
            .entry(module.join("::"))
            .or_default()
            .extend(found);
    }
    Graph { top, by_module }
}

#[test]
fn leaf_modules_import_nothing_of_the_crate() {
    let graph = graph();
    for leaf in LEAVES {
        let found = graph
            .by_module
            .get(leaf)
            .unwrap_or_else(|| panic!("no module {leaf} in src/"));
        let own = leaf.split("::").next().unwrap_or_default();
        let foreign: Vec<_> = found.iter().filter(|(m, _)| m != own).collect();
        assert!(foreign.is_empty(), "{leaf} imports {foreign:?}");
        if leaf.contains("::") {
            assert!(
                found.is_empty(),
                "{leaf} imports {found:?} (its own module's too)"
            );
        }
    }
}

#[test]
fn sinks_never_import_the_store_and_only_app_and_main_import_the_server() {
    let graph = graph();
    let sinks = &graph.top["sinks"];
    assert!(!sinks.contains("store"), "sinks import the store");
    for (module, imports) in &graph.top {
        if imports.contains("server") {
            assert!(
                module == "app" || module == "main",
                "{module} imports the server"
            );
        }
    }
}

#[test]
fn no_two_modules_import_each_other_however_indirectly() {
    let graph = graph();
    // Depth-first search for a back edge; the path found is the cycle reported.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.top.keys() {
        if let Some(cycle) = visit(module, &graph.top, &mut Vec::new(), &mut done) {
            panic!("modules import each other: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_rule_checker_sees_grouped_nested_and_inline_imports() {
    let found = imports(
        "use crate::{config::Config, event::{Event, Source}};\nlet x = crate::store::now();\nuse vyora_router::server;",
    );
    let modules: BTreeSet<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        modules,
        BTreeSet::from(["config", "event", "store", "server"])
    );
    assert!(found.contains(&("config".to_owned(), "Config".to_owned())));
    assert!(
        code("// crate::store in a comment\nfn f() {}")
            .find("store")
            .is_none()
    );
}

/// Sibling name -> the siblings it imports, for the children of the folder `dir` (its
/// `mod.rs` aside); and what each child imports from `mod.rs` itself.
fn siblings(dir: &Path) -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".rs").to_owned())
            .unwrap_or_default();
        let rust = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
        if rust && name != "mod" && name != "tests" {
            names.insert(name);
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut from_parent = Vec::new();
    for name in &names {
        let file = dir.join(format!("{name}.rs"));
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // a folder: its own children are checked on their own
        };
        let code = code(&text);
        let mut found = BTreeSet::new();
        let mut from = 0;
        while let Some(at) = code[from..].find("super::") {
            let start = from + at;
            let rest = &code[start + "super::".len()..];
            if !rest.starts_with("super::") {
                paths(rest, &mut found);
            }
            from = start + "super::".len();
        }
        for (first, _) in found {
            if names.contains(&first) {
                edges.entry(name.clone()).or_default().insert(first);
            } else {
                from_parent.push(format!("{name} imports super::{first}"));
            }
        }
    }
    (edges, from_parent)
}

#[test]
fn an_engines_parts_import_each_other_never_their_folders_mod_rs_and_never_in_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for engine in ["store/sqlite", "store/postgres"] {
        let (edges, from_parent) = siblings(&src.join(engine));
        assert!(
            from_parent.is_empty(),
            "{engine}: what its parts share belongs in a module of its own: {from_parent:?}"
        );
        for start in edges.keys() {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            while let Some((at, path)) = stack.pop() {
                for next in edges.get(&at).into_iter().flatten() {
                    assert!(next != start, "{engine}: {} -> {next}", path.join(" -> "));
                    if !path.contains(next) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push((next.clone(), longer));
                    }
                }
            }
        }
    }
}
