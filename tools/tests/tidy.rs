//! Tidy: the code rules of `ARCHITECTURE.md` ("Code rules"), checked as a test.
//!
//! Goal: rules that reviewers would otherwise repeat live here and fail the build.
//! Method: walk every `.rs` file of the workspace (skipping `target/`) and check each
//! rule, collecting every violation before failing, so one run lists them all.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "target" || name.starts_with('.') {
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
