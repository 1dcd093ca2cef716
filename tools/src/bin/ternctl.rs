//! `ternctl`, the operator tool. Exits non-zero until the engine exists.

fn main() -> std::process::ExitCode {
    tern_tools::not_built("ternctl", "the storage engine and the server")
}
