//! Tidy: the code rules of `ARCHITECTURE.md` ("Code rules"), checked as a test.
//!
//! Goal: rules that reviewers would otherwise repeat live here and fail the build.
//! Method: walk every `.rs` file of the workspace (skipping `target/`) and check each
//! rule, collecting every violation before failing, so one run lists them all.
//!
//! Two rules read the code's shape rather than its lines (issue 18): no function of the
//! edge, the engine or the client runs over [`FN_LINES_MAX`] lines, and no crate's
//! sibling modules import each other in a cycle. Both lean on the code being rustfmt'd
//! (`cargo fmt --all --check` runs in CI), so plain text scanning finds functions and
//! paths without a parser.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // vendor/: other projects' code, kept as they wrote it (VENDORED.md there).
        if name == "target" || name == "vendor" || name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn tidy() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 10, "found only {} Rust files under {}", files.len(), root.display());

    // Spelled in pieces so this file does not trip its own checks.
    let banned = [
        (concat!("db", "g!("), "leftover debug print"),
        (concat!("#[should", "_panic"), "assert the error value instead"),
        (concat!("#[ig", "nore"), "assert the wrong behaviour and leave a FIXME instead"),
        (concat!("to", "do!("), "a stub is not done"),
        (concat!("unimple", "mented!("), "a stub is not done"),
    ];

    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        if !text.starts_with("//!") {
            problems.push(format!("{relative}: must open with a `//!` doc saying why it exists"));
        }
        // The edge keeps its runtime behind one module: the rest of it is plain code.
        let edge_outside_runtime =
            relative.starts_with("edge/src/") && !relative.starts_with("edge/src/runtime/");
        // vodozemac's API moves between minor versions: one SDK module wraps it.
        let sdk_outside_crypto =
            relative.starts_with("client/src/") && relative != "client/src/crypto.rs";
        for (number, line) in text.lines().enumerate() {
            if edge_outside_runtime && line.contains(concat!("glom", "mio::")) {
                let why = "glommio is used only under edge/src/runtime/";
                problems.push(format!("{relative}:{}: {why}", number + 1));
            }
            if sdk_outside_crypto && line.contains(concat!("vodo", "zemac::")) {
                let why = "vodozemac is used only in client/src/crypto.rs";
                problems.push(format!("{relative}:{}: {why}", number + 1));
            }
            if line.chars().count() > 100 {
                problems.push(format!("{relative}:{}: longer than 100 columns", number + 1));
            }
            for (pattern, why) in banned {
                if line.contains(pattern) {
                    problems.push(format!("{relative}:{}: `{pattern}`: {why}", number + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "tidy found problems:\n{}", problems.join("\n"));
}

/// The longest a function may be, in lines from its `fn` line to its closing brace.
const FN_LINES_MAX: usize = 70;

/// The crates (source and tests) whose functions [`FN_LINES_MAX`] bounds.
const FN_LENGTH_CRATES: [&str; 3] = ["edge/", "engine/", "client/"];

/// Functions over [`FN_LINES_MAX`] from before the rule: (path, function name). This list
/// may only shrink: the test fails when one of them is no longer over the limit, so the
/// entry goes with it. Nothing in `edge/` may be listed (issue 18).
const LONG_FUNCTIONS_ALLOWED: &[(&str, &str)] =
    &[("client/tests/e2e.rs", "a_group_talks_end_to_end_and_membership_bounds_who_can_read")];

/// A function: where it starts, its name, and how many lines it spans.
struct Function {
    line: usize,
    name: String,
    lines: usize,
}

/// The name of the function a rustfmt'd line declares (`pub(crate) async fn name(...`),
/// with the line's indentation; `None` for any other line.
fn function_declared(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start();
    let indent = &line[..line.len() - rest.len()];
    let mut rest = rest;
    if let Some(after) = rest.strip_prefix("pub") {
        rest = match after.strip_prefix('(') {
            Some(scope) => scope.split_once(") ")?.1,
            None => after.strip_prefix(' ')?,
        };
    }
    for qualifier in ["const ", "async ", "unsafe "] {
        rest = rest.strip_prefix(qualifier).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    (end > 0).then(|| (indent, &rest[..end]))
}

/// Every function with a body in `text`: a declaration whose signature ends in `{`
/// (one ending in `;` has no body, one ending in `}` is a one-liner), ending at the first
/// later line that is the same indentation followed by `}`.
fn functions(text: &str) -> Vec<Function> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some((indent, name)) = function_declared(line) else { continue };
        let signature_end =
            lines[start..].iter().map(|l| l.trim_end()).position(|l| l.ends_with(['{', ';', '}']));
        let Some(offset) = signature_end else { continue };
        if !lines[start + offset].trim_end().ends_with('{') {
            continue;
        }
        let closing = format!("{indent}}}");
        let body_start = start + offset + 1;
        let Some(end) = lines[body_start..].iter().position(|l| *l == closing) else {
            continue;
        };
        let lines = body_start + end - start + 1;
        found.push(Function { line: start + 1, name: name.to_string(), lines });
    }
    found
}

#[test]
fn no_function_over_70_lines() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut problems = Vec::new();
    let mut allowed_and_long = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap().display().to_string();
        let in_scope = FN_LENGTH_CRATES.iter().any(|c| {
            relative.starts_with(&format!("{c}src/")) || relative.starts_with(&format!("{c}tests/"))
        });
        if !in_scope {
            continue;
        }
        for function in functions(&std::fs::read_to_string(file).unwrap()) {
            if function.lines <= FN_LINES_MAX {
                continue;
            }
            let allowed =
                LONG_FUNCTIONS_ALLOWED.iter().any(|(p, n)| *p == relative && *n == function.name);
            if allowed && !relative.starts_with("edge/") {
                allowed_and_long.insert((relative.clone(), function.name.clone()));
                continue;
            }
            let Function { line, name, lines } = function;
            problems.push(format!(
                "{relative}:{line}: fn {name} has {lines} lines (at most {FN_LINES_MAX}): \
                 extract well-named helpers"
            ));
        }
    }
    for (path, name) in LONG_FUNCTIONS_ALLOWED {
        if !allowed_and_long.contains(&(path.to_string(), name.to_string())) {
            problems.push(format!(
                "{path}: fn {name} is allowed to be long but is not (or is gone, or is in \
                 edge/): remove it from LONG_FUNCTIONS_ALLOWED"
            ));
        }
    }
    assert!(problems.is_empty(), "tidy found long functions:\n{}", problems.join("\n"));
}

/// The crates whose `src/` the import-cycle rule reads.
const CYCLE_CRATES: [&str; 7] = ["wire", "engine", "edge", "client", "tools", "bench", "testkit"];

/// A module path inside one crate (`["core", "delivery"]`); the root is empty.
type ModulePath = Vec<String>;

/// The module each file of `src` defines (`lib.rs`/`main.rs` are the root, `mod.rs` its
/// directory), with the file's text; `src/bin/` is skipped (each file is a crate root).
fn modules_of(src: &Path) -> BTreeMap<PathBuf, (ModulePath, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap().with_extension("");
        let mut path: ModulePath =
            relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
        if path.first().is_some_and(|first| first == "bin") {
            continue;
        }
        if path.last().is_some_and(|last| ["lib", "main", "mod"].contains(&last.as_str())) {
            path.pop();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        modules.insert(relative.with_extension("rs"), (path, text));
    }
    modules
}

/// The paths a `use` tree names, its `{}` groups expanded: `a::{b, c::{d, e}}` gives
/// `a::b`, `a::c::d` and `a::c::e` (an `as` rename is dropped).
fn expand_use_tree(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or("").trim().to_string()];
    };
    let close = tree.rfind('}').filter(|close| *close > open).unwrap_or(tree.len());
    let (prefix, body) = (&tree[..open], &tree[open + 1..close]);
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    let nested = parts.iter().filter(|part| !part.trim().is_empty());
    nested.flat_map(|part| expand_use_tree(part)).map(|path| format!("{prefix}{path}")).collect()
}

/// Every path `text` names that may point into its own crate: the `use` trees (groups
/// expanded) and the inline `crate::…`, `super::…` and `self::…` paths, outside comments.
fn referenced_paths(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .fold(String::new(), |code, line| code + line + "\n");
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let starts_word = |at: usize| !code[..at].ends_with(is_ident);
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("use ").filter(|(at, _)| starts_word(*at)) {
        if let Some(end) = code[at..].find(';') {
            let tree: Vec<&str> = code[at + 4..at + end].split_whitespace().collect();
            paths.extend(expand_use_tree(&tree.join(" ")));
        }
    }
    for keyword in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(keyword).filter(|(at, _)| starts_word(*at)) {
            let tail = &code[at..];
            let end = tail.find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(tail.len());
            paths.push(tail[..end].trim_end_matches(':').to_string());
        }
    }
    paths
}

/// The module `path`, named in module `from`, points into: the longest known module
/// that prefixes it; `None` when it names another crate.
fn resolve(from: &[String], path: &str, known: &BTreeSet<ModulePath>) -> Option<ModulePath> {
    let segments: Vec<&str> = path.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
    let (mut full, rest): (ModulePath, &[&str]) = match segments.first()? {
        &"crate" => (Vec::new(), &segments[1..]),
        &"self" => (from.to_vec(), &segments[1..]),
        &"super" => {
            let ups = segments.iter().take_while(|s| **s == "super").count();
            (from[..from.len().saturating_sub(ups)].to_vec(), &segments[ups..])
        }
        first => {
            // A path relative to `from`: a child module, or something of another crate.
            let child = [from, &[first.to_string()]].concat();
            if !known.contains(&child) {
                return None;
            }
            (from.to_vec(), &segments[..])
        }
    };
    full.extend(rest.iter().map(|s| s.to_string()));
    while !full.is_empty() && !known.contains(&full) {
        full.pop();
    }
    Some(full)
}

/// A reference between two modules, as the edge between the siblings just below their
/// common ancestor it makes (`None` for a module naming itself, an ancestor or a
/// descendant: a parent uses its children and a child its parent freely).
fn sibling_edge(from: &[String], to: &[String]) -> Option<(ModulePath, ModulePath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

/// The modules `start` reaches by following `edges`, itself included.
fn reachable(
    edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
    start: &ModulePath,
) -> BTreeSet<ModulePath> {
    let (mut seen, mut todo) = (BTreeSet::from([start.clone()]), vec![start.clone()]);
    while let Some(module) = todo.pop() {
        for next in edges.get(&module).into_iter().flatten() {
            if seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

/// The groups of sibling modules that import each other in a cycle (the strongly
/// connected components of more than one module).
fn cycles(edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<BTreeSet<ModulePath>> {
    let reach: BTreeMap<&ModulePath, BTreeSet<ModulePath>> =
        edges.keys().map(|module| (module, reachable(edges, module))).collect();
    let mut found: Vec<BTreeSet<ModulePath>> = Vec::new();
    for (module, from_it) in &reach {
        let component: BTreeSet<ModulePath> = from_it
            .iter()
            .filter(|other| reach.get(other).is_some_and(|back| back.contains(*module)))
            .cloned()
            .collect();
        if component.len() > 1 && !found.contains(&component) {
            found.push(component);
        }
    }
    found
}

/// The import cycles between sibling modules of the crate whose sources are in `src`,
/// each described with the file-level references that make it.
fn import_cycles(crate_name: &str, src: &Path) -> Vec<String> {
    let modules = modules_of(src);
    let known: BTreeSet<ModulePath> = modules.values().map(|(path, _)| path.clone()).collect();
    let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    let mut evidence: BTreeSet<(ModulePath, ModulePath, String, String)> = BTreeSet::new();
    for (file, (module, text)) in &modules {
        for path in referenced_paths(text) {
            let Some(target) = resolve(module, &path, &known) else { continue };
            let Some((from, to)) = sibling_edge(module, &target) else { continue };
            edges.entry(from.clone()).or_default().insert(to.clone());
            let file = format!("{crate_name}/src/{}", file.display());
            evidence.insert((from, to, file, target.join("::")));
        }
    }
    let mut problems = Vec::new();
    for cycle in cycles(&edges) {
        let names: Vec<String> = cycle.iter().map(|m| format!("`{}`", m.join("::"))).collect();
        let mut problem = format!("{crate_name}: modules {} import each other:", names.join(", "));
        for (from, to, file, target) in &evidence {
            if cycle.contains(from) && cycle.contains(to) {
                problem.push_str(&format!("\n    {file} uses `{target}`"));
            }
        }
        problems.push(problem);
    }
    problems
}

#[test]
fn no_import_cycle_between_sibling_modules() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for crate_name in CYCLE_CRATES {
        problems.extend(import_cycles(crate_name, &root.join(crate_name).join("src")));
    }
    assert!(
        problems.is_empty(),
        "tidy found import cycles (move what both sides share into a module below them):\n{}",
        problems.join("\n")
    );
}
