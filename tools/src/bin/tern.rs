//! `tern`, the chat CLI. Exits non-zero until the client SDK exists.

fn main() -> std::process::ExitCode {
    tern_tools::not_built("tern", "the server (ternd) and the client SDK")
}
