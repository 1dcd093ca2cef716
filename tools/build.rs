//! Build script shared by `tern-tools` and `tern-edge` (`edge/build.rs` includes this
//! file): sets `TERN_VERSION` to the product version from the workspace manifest
//! (`[workspace.package] version`), plus the git commit when built from a checkout,
//! so that `tern --version`, `ternctl --version` and `ternd --version` say which code
//! they are.

use std::path::Path;
use std::process::Command;

/// Sets `TERN_VERSION` (public so that `edge/build.rs` can call it).
pub fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
    let root = Path::new(&manifest_dir).parent().expect("a crate of the workspace");
    let manifest = root.join("Cargo.toml");
    println!("cargo:rerun-if-changed={}", manifest.display());
    let text = std::fs::read_to_string(&manifest).unwrap_or_default();
    let version = workspace_version(&text).unwrap_or_else(|| "unknown".into());
    let version = match git(root, &["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            // A new commit (or a branch switch) moves HEAD or the ref it names.
            for file in ["HEAD", "refs/heads", "packed-refs"] {
                if let Some(path) = git(root, &["rev-parse", "--git-path", file]) {
                    println!("cargo:rerun-if-changed={}", root.join(path).display());
                }
            }
            format!("{version} (git {commit})")
        }
        None => version,
    };
    println!("cargo:rustc-env=TERN_VERSION={version}");
}

/// The `version` of the manifest's `[workspace.package]` table.
fn workspace_version(manifest: &str) -> Option<String> {
    let mut in_table = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == "[workspace.package]";
        } else if let Some(value) = line.strip_prefix("version").filter(|_| in_table) {
            let value = value.trim_start().strip_prefix('=')?.trim().trim_matches('"');
            return Some(value.to_string());
        }
    }
    None
}

/// The trimmed output of a successful `git` command run in `dir`.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}
