//! `ternd` entry point. Exits non-zero until the server exists (see the crate docs).

fn main() -> std::process::ExitCode {
    eprintln!("{}", tern_edge::NOT_BUILT);
    std::process::ExitCode::from(2)
}
