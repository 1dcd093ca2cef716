//! `tern-engine`: Tern's embedded store (append-only segment log, mailbox index, state
//! tables, checkpoints, space reclaim).
//!
//! Not built yet: the engine is the subject of the next milestone issue. The format it
//! will store is already fixed by `tern-wire`: an envelope record is the rkyv archive
//! of `tern_wire::messages::Envelope`, appended as-is and later framed for delivery
//! with `tern_wire::encode_deliver` without re-encoding.

#![forbid(unsafe_code)]
