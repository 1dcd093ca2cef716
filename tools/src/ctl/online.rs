//! Online commands: per-core figures read from a live server's admin port.

use super::{CtlError, Outcome};

/// `ternctl stats`.
pub fn stats(_admin: &str) -> Result<Outcome, CtlError> {
    Err("ternctl stats is not built yet".into())
}

/// `ternctl top`.
pub fn top(_admin: &str) -> Result<Outcome, CtlError> {
    Err("ternctl top is not built yet".into())
}
