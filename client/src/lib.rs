//! `tern-client`: the SDK apps embed (connection, reconnect/resume, end-to-end
//! encryption with vodozemac, local history and search, media).
//!
//! Not built yet: it needs a running `ternd`. Until then, apps can speak the protocol
//! directly with `tern-wire`.

#![forbid(unsafe_code)]
