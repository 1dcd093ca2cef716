//! Delivering verification codes: the `CodeSender` seam.
//!
//! `LogCodeSender` writes the code to the server log, for development and tests (a test
//! reads it from `ternd`'s output). An SMS gateway sender (HTTP webhook with retries) is
//! the next implementation; the core only sees the trait.

/// Sends a verification code to a phone number.
pub trait CodeSender {
    /// Sends `code` to `phone` (best effort; failures are logged by the sender).
    fn send_code(&self, phone: &str, code: &str);
}

/// Writes codes to the log (development only: anyone who reads the log can register).
#[derive(Debug, Default)]
pub struct LogCodeSender;

impl CodeSender for LogCodeSender {
    fn send_code(&self, phone: &str, code: &str) {
        tracing::info!(target: "tern::codes", phone, code, "verification code (log sender)");
    }
}
