//! `ternd`'s build script: the same `TERN_VERSION` (workspace version and git commit)
//! as `tern` and `ternctl`, from the one script in `tools/build.rs`.

#[path = "../tools/build.rs"]
mod version;

fn main() {
    version::main();
}
