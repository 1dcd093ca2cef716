//! Offline commands: read a data directory without writing to it.

use std::path::Path;

use super::{CtlError, Outcome};

/// `ternctl inspect`.
pub fn inspect(_dir: &Path, _json: bool) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}

/// `ternctl verify`.
pub fn verify(_dir: &Path, _quiet: bool) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}

/// `ternctl dump`.
pub fn dump(
    _dir: &Path,
    _segment: Option<(u64, u32)>,
    _mailbox: Option<&str>,
) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}

/// `ternctl mailboxes`.
pub fn mailboxes(_dir: &Path, _top: usize) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}

/// `ternctl user`.
pub fn user(_dir: &Path, _phone: Option<&str>, _id: Option<u64>) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}

/// `ternctl reports`.
pub fn reports(_dir: &Path) -> Result<Outcome, CtlError> {
    Err("not built yet".into())
}
