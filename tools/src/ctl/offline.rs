//! Offline commands: read a data directory without writing to it.
//!
//! Two ways in, both read-only. Raw files: segments are scanned record by record
//! (`tern_engine::record::scan_segment`, the same code recovery uses) and checkpoints
//! decoded, for `inspect`, `verify` and `dump --segment`. A recovered shard: recovery
//! runs on `ReadOnlyStorage`, which discards every change it would make, so the mailbox
//! indexes and state tables are exactly what `ternd` would rebuild, even beside a live
//! server; `mailboxes`, `user`, `reports` and `dump --mailbox` read those. Ciphertext is
//! never printed: bodies appear as their length and SHA-256.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use futures_lite::future::block_on;
use rkyv::rancor::Failure;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tern_engine::body::{
    ArchivedAckRecord, ArchivedCommitRecord, ArchivedEnvelopeRecord, ArchivedRemoveRecord,
    ArchivedStateOp,
};
use tern_engine::record::{parse_segment_file_name, scan_segment, RecordType, ScanEnd};
use tern_engine::{
    checkpoint, DataDir, ReadOnlyStorage, ShardConfig, ShardHandle, StateOp, Storage as _,
};
use tern_wire::messages::{ArchivedEnvelope, Conversation, Envelope};

use super::{CtlError, Outcome};

/// A shard recovered in memory from its files.
type ReadShard = ShardHandle<ReadOnlyStorage>;

fn open_data_dir(dir: &Path) -> Result<DataDir, CtlError> {
    DataDir::open_existing(dir).map_err(|e| {
        format!(
            "{} is not a readable Tern data directory ({e}); give the --data-dir of ternd",
            dir.display()
        )
        .into()
    })
}

/// Recovers shard `shard_id` in memory. A live server may replace a checkpoint or delete
/// a segment between the listing and the read: try again a few times.
fn open_shard(data_dir: &DataDir, shard_id: u32) -> Result<ReadShard, CtlError> {
    let path = data_dir.shard_dir(shard_id);
    let mut last_error = None;
    for _ in 0..5 {
        let storage = ReadOnlyStorage::new(&path);
        match block_on(ShardHandle::open(storage, ShardConfig::new(shard_id))) {
            Ok(shard) => return Ok(shard),
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let error = last_error.expect("at least one attempt");
    Err(format!("shard {shard_id} ({}) does not open: {error}", path.display()).into())
}

fn open_all(data_dir: &DataDir) -> Result<Vec<(u32, ReadShard)>, CtlError> {
    (0..data_dir.manifest().shard_count).map(|id| Ok((id, open_shard(data_dir, id)?))).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Length and SHA-256 of a body: what `ternctl` shows instead of ciphertext.
fn body_summary(body: &[u8]) -> Value {
    json!({ "len": body.len(), "sha256": hex::encode(Sha256::digest(body)) })
}

fn envelope_json(bytes: &[u8]) -> Value {
    let Ok(archived) = rkyv::access::<ArchivedEnvelope, Failure>(bytes) else {
        return json!({ "invalid_archive": true, "len": bytes.len() });
    };
    let Ok(envelope) = rkyv::deserialize::<Envelope, Failure>(archived) else {
        return json!({ "invalid_archive": true, "len": bytes.len() });
    };
    let conversation = match envelope.conversation {
        Conversation::User(user) => json!({ "user": user }),
        Conversation::Group(group) => json!({ "group": group }),
    };
    json!({
        "server_message_id": envelope.server_message_id,
        "client_message_id": envelope.client_message_id,
        "server_time_ms": envelope.server_time_ms,
        "expires_ms": envelope.expires_ms,
        "sender": format!("{}:{}", envelope.sender_user, envelope.sender_device),
        "conversation": conversation,
        "conversation_seq": envelope.conversation_seq,
        "kind": format!("{:?}", envelope.kind),
        "e2e_type": format!("{:?}", envelope.e2e_type),
        "body": body_summary(&envelope.body),
    })
}

/// A state change as JSON: ids, names and counts; secrets (token and PIN hashes) and
/// key material only as their presence or count.
fn state_op_json(op: &StateOp) -> Value {
    match op {
        StateOp::PutAccount { user_id, phone, created_ms } => {
            json!({ "op": "PutAccount", "user_id": user_id, "phone": phone,
                    "created_ms": created_ms })
        }
        StateOp::DeleteAccount { user_id } => json!({ "op": "DeleteAccount", "user_id": user_id }),
        StateOp::PutDevice { user_id, device } => json!({
            "op": "PutDevice", "user_id": user_id, "device_id": device.device_id,
            "name": device.name, "one_time_keys": device.one_time_keys.len(),
        }),
        StateOp::RemoveDevice { user_id, device_id } => {
            json!({ "op": "RemoveDevice", "user_id": user_id, "device_id": device_id })
        }
        StateOp::SetToken { user_id, device_id, .. } => {
            json!({ "op": "SetToken", "user_id": user_id, "device_id": device_id })
        }
        StateOp::AddOneTimeKeys { user_id, device_id, keys } => json!({
            "op": "AddOneTimeKeys", "user_id": user_id, "device_id": device_id,
            "keys": keys.len(),
        }),
        StateOp::SetFallbackKey { user_id, device_id, key } => json!({
            "op": "SetFallbackKey", "user_id": user_id, "device_id": device_id,
            "key_id": key.key_id,
        }),
        StateOp::ClaimOneTimeKey { user_id, device_id, key_id } => json!({
            "op": "ClaimOneTimeKey", "user_id": user_id, "device_id": device_id, "key_id": key_id,
        }),
        StateOp::SetPush { user_id, device_id, endpoint } => json!({
            "op": "SetPush", "user_id": user_id, "device_id": device_id, "set": endpoint.is_some(),
        }),
        StateOp::PutGroup { group } => json!({
            "op": "PutGroup", "group_id": group.group_id, "epoch": group.epoch,
            "members": group.members.len(),
        }),
        StateOp::DeleteGroup { group_id } => json!({ "op": "DeleteGroup", "group_id": group_id }),
        StateOp::SetBlocked { user_id, other, blocked } => json!({
            "op": "SetBlocked", "user_id": user_id, "other": other, "blocked": blocked,
        }),
        StateOp::SetProfile { user_id, .. } => json!({ "op": "SetProfile", "user_id": user_id }),
        StateOp::SetPrivacy { user_id, .. } => json!({ "op": "SetPrivacy", "user_id": user_id }),
        StateOp::SetContacts { user_id, contacts } => {
            json!({ "op": "SetContacts", "user_id": user_id, "contacts": contacts.len() })
        }
        StateOp::SetRegistrationLock { user_id, pin_hash } => json!({
            "op": "SetRegistrationLock", "user_id": user_id, "locked": pin_hash.is_some(),
        }),
        StateOp::SetLastSeen { user_id, last_seen_ms } => {
            json!({ "op": "SetLastSeen", "user_id": user_id, "last_seen_ms": last_seen_ms })
        }
        StateOp::PutMedia { media } => json!({
            "op": "PutMedia", "media_id": hex::encode(media.media_id), "owner": media.owner,
            "size_bytes": media.size_bytes,
        }),
        StateOp::DeleteMedia { media_id } => {
            json!({ "op": "DeleteMedia", "media_id": hex::encode(media_id) })
        }
        StateOp::NoteSend {
            sender_user,
            sender_device,
            client_message_id,
            server_message_id,
            ..
        } => {
            json!({ "op": "NoteSend", "sender": format!("{sender_user}:{sender_device}"),
                    "client_message_id": client_message_id,
                    "server_message_id": server_message_id })
        }
        StateOp::AddReport { report } => json!({
            "op": "AddReport", "reporter": report.reporter, "reported": report.reported,
        }),
        StateOp::SetDeviceList { user_id, device_list } => json!({
            "op": "SetDeviceList", "user_id": user_id, "bytes": device_list.len(),
        }),
        StateOp::SetRegistrationFailures { failures } => json!({
            "op": "SetRegistrationFailures", "phone": failures.phone, "day": failures.day,
            "wrong_codes": failures.wrong_codes, "wrong_pins": failures.wrong_pins,
        }),
    }
}

/// Whether a record's body is a valid archive of its type.
fn body_is_valid(record_type: RecordType, body: &[u8]) -> bool {
    match record_type {
        RecordType::Envelope => rkyv::access::<ArchivedEnvelopeRecord, Failure>(body)
            .is_ok_and(|r| rkyv::access::<ArchivedEnvelope, Failure>(&r.envelope).is_ok()),
        RecordType::Ack => rkyv::access::<ArchivedAckRecord, Failure>(body).is_ok(),
        RecordType::Remove => rkyv::access::<ArchivedRemoveRecord, Failure>(body).is_ok(),
        RecordType::Commit => rkyv::access::<ArchivedCommitRecord, Failure>(body).is_ok(),
        RecordType::State => rkyv::access::<ArchivedStateOp, Failure>(body).is_ok(),
    }
}

/// One record as a JSON line (`dump --segment`).
fn record_json(record_type: RecordType, flags: u8, body: &[u8]) -> Value {
    match record_type {
        RecordType::Envelope => match rkyv::access::<ArchivedEnvelopeRecord, Failure>(body) {
            Ok(record) => {
                let slots: Vec<String> = record
                    .slots
                    .iter()
                    .map(|s| format!("{}:{}#{}", s.user_id, s.device_id, s.mailbox_seq))
                    .collect();
                json!({ "slots": slots, "moved": flags & 1 != 0,
                        "envelope": envelope_json(&record.envelope) })
            }
            Err(_) => json!({ "invalid_archive": true }),
        },
        RecordType::Ack => match rkyv::access::<ArchivedAckRecord, Failure>(body) {
            Ok(ack) => json!({ "device": format!("{}:{}", ack.user_id, ack.device_id),
                               "up_to_mailbox_seq": ack.up_to_mailbox_seq.to_native() }),
            Err(_) => json!({ "invalid_archive": true }),
        },
        RecordType::Remove => match rkyv::access::<ArchivedRemoveRecord, Failure>(body) {
            Ok(remove) => json!({ "device": format!("{}:{}", remove.user_id, remove.device_id),
                                  "mailbox_seq": remove.mailbox_seq.to_native() }),
            Err(_) => json!({ "invalid_archive": true }),
        },
        RecordType::Commit => match rkyv::access::<ArchivedCommitRecord, Failure>(body) {
            Ok(commit) => json!({ "batch_first_seq": commit.batch_first_seq.to_native(),
                                  "batch_records": commit.batch_records.to_native() }),
            Err(_) => json!({ "invalid_archive": true }),
        },
        RecordType::State => match rkyv::access::<ArchivedStateOp, Failure>(body)
            .and_then(rkyv::deserialize::<StateOp, Failure>)
        {
            Ok(op) => state_op_json(&op),
            Err(_) => json!({ "invalid_archive": true }),
        },
    }
}

/// The files of one shard directory: checkpoints and segments, by id.
struct ShardFiles {
    checkpoints: Vec<(u64, PathBuf)>,
    segments: BTreeMap<u64, PathBuf>,
}

fn shard_files(data_dir: &DataDir, shard_id: u32) -> Result<ShardFiles, CtlError> {
    let dir = data_dir.shard_dir(shard_id);
    let names = ReadOnlyStorage::new(&dir)
        .list()
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut files = ShardFiles { checkpoints: Vec::new(), segments: BTreeMap::new() };
    for name in names {
        if let Some(covered) = checkpoint::parse_file_name(&name) {
            files.checkpoints.push((covered, dir.join(&name)));
        } else if let Some(id) = parse_segment_file_name(&name) {
            files.segments.insert(id, dir.join(&name));
        }
    }
    files.checkpoints.sort();
    Ok(files)
}

fn map(path: &Path) -> Result<tern_engine::storage::Mapped, CtlError> {
    tern_engine::storage::map_file(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}

// ---------------------------------------------------------------------------------------
// inspect
// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct DirReport {
    manifest: ManifestReport,
    shards: Vec<ShardReport>,
}

#[derive(Debug, Serialize)]
struct ManifestReport {
    format_version: u32,
    shard_count: u32,
    created_ms: u64,
}

#[derive(Debug, Serialize)]
struct ShardReport {
    shard: u32,
    checkpoints: Vec<CheckpointReport>,
    segments: Vec<SegmentReport>,
    devices_with_mail: usize,
    queued_envelopes: u64,
    accounts: usize,
    groups: usize,
    media: usize,
    reports: usize,
    quarantined_records: usize,
}

#[derive(Debug, Serialize)]
struct CheckpointReport {
    file: String,
    covered_seq: u64,
    bytes: u64,
    valid: bool,
}

#[derive(Debug, Default, Serialize)]
struct SegmentReport {
    segment: u64,
    active: bool,
    file_bytes: u64,
    written_bytes: u64,
    live_bytes: u64,
    garbage_bytes: u64,
    live_envelopes: u64,
    records: BTreeMap<String, u64>,
    corrupt_records: usize,
    torn_tail: bool,
}

fn inspect_shard(data_dir: &DataDir, shard_id: u32) -> Result<ShardReport, CtlError> {
    let files = shard_files(data_dir, shard_id)?;
    let shard = open_shard(data_dir, shard_id)?;
    let shard = shard.borrow();
    let stats = shard.segment_stats();
    let last = files.segments.keys().next_back().copied();
    let mut segments = Vec::new();
    for (&id, path) in &files.segments {
        let bytes = map(path)?;
        let mut report = SegmentReport {
            segment: id,
            active: Some(id) == last,
            file_bytes: bytes.len() as u64,
            ..SegmentReport::default()
        };
        if let Ok(scan) = scan_segment(&bytes) {
            for record in &scan.records {
                *report.records.entry(format!("{:?}", record.header.record_type)).or_default() += 1;
            }
            report.corrupt_records = scan.faults.len();
            report.torn_tail = matches!(scan.end, ScanEnd::TornTail { .. });
            report.written_bytes = scan.end.committed_end();
        } else {
            report.corrupt_records = 1;
        }
        let live = stats.get(&(id as u32)).copied().unwrap_or_default();
        report.live_bytes = live.live_bytes;
        report.live_envelopes = live.live_records;
        report.garbage_bytes = report.written_bytes.saturating_sub(live.live_bytes);
        segments.push(report);
    }
    let checkpoints = files
        .checkpoints
        .iter()
        .map(|(covered, path)| {
            let bytes = std::fs::read(path).unwrap_or_default();
            CheckpointReport {
                file: path.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                covered_seq: *covered,
                bytes: bytes.len() as u64,
                valid: checkpoint::decode(&bytes).is_ok(),
            }
        })
        .collect();
    let state = shard.state();
    Ok(ShardReport {
        shard: shard_id,
        checkpoints,
        segments,
        devices_with_mail: shard.mailbox_backlogs().filter(|(_, n)| *n > 0).count(),
        queued_envelopes: shard.mailbox_backlogs().map(|(_, n)| n).sum(),
        accounts: state.accounts.len(),
        groups: state.groups.len(),
        media: state.media.len(),
        reports: state.reports.len(),
        quarantined_records: shard.quarantined().len(),
    })
}

/// `ternctl inspect`.
pub fn inspect(dir: &Path, as_json: bool) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let manifest = data_dir.manifest();
    let report = DirReport {
        manifest: ManifestReport {
            format_version: manifest.format_version,
            shard_count: manifest.shard_count,
            created_ms: manifest.created_ms,
        },
        shards: (0..manifest.shard_count)
            .map(|id| inspect_shard(&data_dir, id))
            .collect::<Result<_, _>>()?,
    };
    let mut out = std::io::stdout().lock();
    if as_json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(Outcome::Ok);
    }
    writeln!(
        out,
        "{}: format {}, {} shards, created {}",
        dir.display(),
        manifest.format_version,
        manifest.shard_count,
        crate::time::utc_datetime(manifest.created_ms)
    )?;
    for shard in &report.shards {
        writeln!(
            out,
            "\nshard {:04}: {} accounts, {} groups, {} media, {} reports; {} envelopes queued \
             for {} devices; {} quarantined records",
            shard.shard,
            shard.accounts,
            shard.groups,
            shard.media,
            shard.reports,
            shard.queued_envelopes,
            shard.devices_with_mail,
            shard.quarantined_records
        )?;
        for c in &shard.checkpoints {
            let valid = if c.valid { "valid" } else { "DAMAGED" };
            writeln!(out, "  {} ({} bytes, {valid})", c.file, c.bytes)?;
        }
        writeln!(
            out,
            "  {:>8} {:>6} {:>11} {:>11} {:>11} {:>11}  records by type",
            "segment", "", "written", "live", "garbage", "live env."
        )?;
        for s in &shard.segments {
            let records: Vec<String> = s.records.iter().map(|(t, n)| format!("{t} {n}")).collect();
            let mut notes = String::new();
            if s.corrupt_records > 0 {
                notes.push_str(&format!("; {} CORRUPT", s.corrupt_records));
            }
            if s.torn_tail {
                notes.push_str("; torn tail");
            }
            writeln!(
                out,
                "  {:>8} {:>6} {:>11} {:>11} {:>11} {:>11}  {}{notes}",
                s.segment,
                if s.active { "active" } else { "sealed" },
                s.written_bytes,
                s.live_bytes,
                s.garbage_bytes,
                s.live_envelopes,
                records.join(", ")
            )?;
        }
    }
    Ok(Outcome::Ok)
}

// ---------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------

/// One problem `verify` found.
#[derive(Debug)]
struct Finding {
    place: String,
    what: String,
}

fn verify_shard(
    data_dir: &DataDir,
    shard_id: u32,
    progress: &indicatif::ProgressBar,
    findings: &mut Vec<Finding>,
) -> Result<u64, CtlError> {
    let files = shard_files(data_dir, shard_id)?;
    let mut records = 0;
    for (_, path) in &files.checkpoints {
        let bytes = std::fs::read(path).unwrap_or_default();
        if let Err(fault) = checkpoint::decode(&bytes) {
            findings.push(Finding {
                place: format!("shard {shard_id} {}", path.display()),
                what: format!("checkpoint damaged ({fault:?}); recovery falls back to the log"),
            });
        }
        progress.inc(bytes.len() as u64);
    }
    let last = files.segments.keys().next_back().copied();
    for (&id, path) in &files.segments {
        let bytes = map(path)?;
        let place = |offset: u64| format!("shard {shard_id} segment {id} offset {offset}");
        match scan_segment(&bytes) {
            // Recovery removes a last segment whose header never reached the disk (its
            // creation was cut short: nothing in it was acknowledged).
            Err(_) if Some(id) == last && bytes.iter().take(40).all(|b| *b == 0) => {}
            Err(fault) => findings.push(Finding { place: place(0), what: format!("{fault:?}") }),
            Ok(scan) => {
                for fault in &scan.faults {
                    findings.push(Finding {
                        place: place(fault.offset),
                        what: format!(
                            "corrupt record ({:?}); the next valid record is at {}",
                            fault.fault, fault.resumed_at
                        ),
                    });
                }
                for record in &scan.records {
                    if !body_is_valid(record.header.record_type, record.body) {
                        findings.push(Finding {
                            place: place(record.offset),
                            what: format!(
                                "{:?} record (seq {}) whose body is not a valid archive",
                                record.header.record_type, record.header.record_seq
                            ),
                        });
                    }
                }
                records += scan.records.len() as u64;
                if let ScanEnd::TornTail { fault_offset, fault, .. } = scan.end {
                    if Some(id) != last {
                        findings.push(Finding {
                            place: place(fault_offset),
                            what: format!("a sealed segment ends in damage ({fault:?})"),
                        });
                    }
                }
            }
        }
        progress.inc(bytes.len() as u64);
    }
    // What recovery itself refuses (a lost segment, a checkpoint that does not fit).
    match open_shard(data_dir, shard_id) {
        Err(error) => {
            findings.push(Finding { place: format!("shard {shard_id}"), what: error.to_string() })
        }
        Ok(shard) => verify_media(data_dir, &shard, findings),
    }
    Ok(records)
}

/// Every committed blob the shard's records name exists and matches its SHA-256.
fn verify_media(data_dir: &DataDir, shard: &ReadShard, findings: &mut Vec<Finding>) {
    let shard = shard.borrow();
    for media in shard.state().media.values() {
        let Some(expected) = media.sha256 else { continue };
        let path = data_dir.root().join("media").join(hex::encode(media.media_id));
        match std::fs::read(&path) {
            Ok(bytes) if Sha256::digest(&bytes).as_slice() == expected => {}
            Ok(_) => findings.push(Finding {
                place: path.display().to_string(),
                what: "media blob does not match its SHA-256".into(),
            }),
            Err(e) => findings.push(Finding {
                place: path.display().to_string(),
                what: format!("media blob unreadable: {e}"),
            }),
        }
    }
}

/// `ternctl verify`.
pub fn verify(dir: &Path, quiet: bool) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let shard_count = data_dir.manifest().shard_count;
    let mut total_bytes = 0;
    for shard_id in 0..shard_count {
        let files = shard_files(&data_dir, shard_id)?;
        let paths = files.checkpoints.iter().map(|(_, p)| p).chain(files.segments.values());
        total_bytes +=
            paths.filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum::<u64>();
    }
    let progress = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {eta}")
                .expect("a valid template"),
        );
        bar
    };
    let mut findings = Vec::new();
    let mut records = 0;
    for shard_id in 0..shard_count {
        records += verify_shard(&data_dir, shard_id, &progress, &mut findings)?;
    }
    progress.finish_and_clear();
    let mut out = std::io::stdout().lock();
    for finding in &findings {
        writeln!(out, "CORRUPT {}: {}", finding.place, finding.what)?;
    }
    if findings.is_empty() {
        writeln!(out, "ok: {shard_count} shards, {records} records, every CRC and archive intact")?;
        Ok(Outcome::Ok)
    } else {
        writeln!(out, "{} problems found in {}", findings.len(), dir.display())?;
        Ok(Outcome::Problem)
    }
}

// ---------------------------------------------------------------------------------------
// dump
// ---------------------------------------------------------------------------------------

/// Parses `USER` or `USER:DEVICE`.
fn parse_device(text: &str) -> Result<(u64, Option<u32>), CtlError> {
    let bad = || format!("{text:?} is not USER or USER:DEVICE (numbers)");
    match text.split_once(':') {
        Some((user, device)) => {
            Ok((user.parse().map_err(|_| bad())?, Some(device.parse().map_err(|_| bad())?)))
        }
        None => Ok((text.parse().map_err(|_| bad())?, None)),
    }
}

/// `ternctl dump`: one segment's records, or one user's (device's) queued envelopes.
pub fn dump(
    dir: &Path,
    segment: Option<(u64, u32)>,
    mailbox: Option<&str>,
) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let mut out = std::io::stdout().lock();
    if let Some((segment_id, shard_id)) = segment {
        let files = shard_files(&data_dir, shard_id)?;
        let path = files.segments.get(&segment_id).ok_or_else(|| {
            format!("shard {shard_id} has no segment {segment_id}; see ternctl inspect")
        })?;
        let bytes = map(path)?;
        let scan = scan_segment(&bytes).map_err(|e| format!("{}: {e:?}", path.display()))?;
        let mut outcome = Outcome::Ok;
        for record in &scan.records {
            let line = json!({
                "shard": shard_id, "segment": segment_id, "offset": record.offset,
                "seq": record.header.record_seq,
                "type": format!("{:?}", record.header.record_type),
                "bytes": record.header.record_bytes(),
                "body": record_json(record.header.record_type, record.header.flags, record.body),
            });
            writeln!(out, "{line}")?;
        }
        for fault in &scan.faults {
            outcome = Outcome::Problem;
            let line = json!({ "shard": shard_id, "segment": segment_id, "offset": fault.offset,
                               "corrupt": format!("{:?}", fault.fault) });
            writeln!(out, "{line}")?;
        }
        return Ok(outcome);
    }
    let (user_id, device_id) = parse_device(mailbox.unwrap_or_default())?;
    let mut found = false;
    let mut outcome = Outcome::Ok;
    for (shard_id, shard) in open_all(&data_dir)? {
        let shard = shard.borrow();
        let mut devices: Vec<(u64, u32)> = shard
            .mailbox_backlogs()
            .map(|(device, _)| device)
            .filter(|(u, d)| *u == user_id && device_id.is_none_or(|want| want == *d))
            .collect();
        devices.sort_unstable();
        for device in devices {
            found = true;
            let head = shard.mailbox_head_seq(device);
            let read = shard.read_mailbox(device, head, usize::MAX, now_ms());
            for entry in &read.entries {
                let line = json!({
                    "shard": shard_id, "device": format!("{}:{}", device.0, device.1),
                    "mailbox_seq": entry.mailbox_seq, "envelope": envelope_json(entry.envelope),
                });
                writeln!(out, "{line}")?;
            }
            for corrupt in &read.corrupt {
                outcome = Outcome::Problem;
                let device = format!("{}:{}", device.0, device.1);
                let line =
                    json!({ "shard": shard_id, "device": device, "corrupt": corrupt.to_string() });
                writeln!(out, "{line}")?;
            }
        }
    }
    if !found {
        eprintln!("no mailbox of {} in {}", mailbox.unwrap_or_default(), dir.display());
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// mailboxes, user, reports
// ---------------------------------------------------------------------------------------

/// `ternctl mailboxes`: the devices with the most queued envelopes.
pub fn mailboxes(dir: &Path, top: usize) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let mut rows = Vec::new();
    for (shard_id, shard) in open_all(&data_dir)? {
        let backlogs: Vec<((u64, u32), u64)> =
            shard.borrow().mailbox_backlogs().filter(|(_, n)| *n > 0).collect();
        for (device, queued) in backlogs {
            let bytes = shard.borrow_mut().mailbox_bytes(device);
            let oldest_ms = {
                let shard = shard.borrow();
                let head = shard.mailbox_head_seq(device);
                let read = shard.read_mailbox(device, head, 1, now_ms());
                read.entries.first().and_then(|e| {
                    rkyv::access::<ArchivedEnvelope, Failure>(e.envelope)
                        .ok()
                        .map(|e| e.server_time_ms.to_native())
                })
            };
            rows.push((queued, bytes, device, shard_id, oldest_ms));
        }
    }
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>22} {:>5} {:>10} {:>12} {:>12}",
        "user:device", "shard", "queued", "bytes", "oldest age s"
    )?;
    let now = now_ms();
    for (queued, bytes, (user, device), shard_id, oldest) in rows.into_iter().take(top) {
        let age = oldest.map_or("-".to_string(), |t| (now.saturating_sub(t) / 1000).to_string());
        writeln!(
            out,
            "{:>22} {shard_id:>5} {queued:>10} {bytes:>12} {age:>12}",
            format!("{user}:{device}")
        )?;
    }
    Ok(Outcome::Ok)
}

/// `ternctl user`: one account as JSON.
pub fn user(dir: &Path, phone: Option<&str>, id: Option<u64>) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let shards = open_all(&data_dir)?;
    let home = shards.iter().find_map(|(shard_id, shard)| {
        let shard = shard.borrow();
        let user_id = match (phone, id) {
            (Some(phone), _) => shard.state().user_by_phone(phone)?,
            (None, Some(id)) => id,
            (None, None) => return None,
        };
        shard.state().account(user_id).map(|a| (*shard_id, a.clone()))
    });
    let Some((home_shard, account)) = home else {
        eprintln!(
            "no account with {} in {}",
            phone.map_or_else(|| format!("id {}", id.unwrap_or(0)), |p| format!("phone {p}")),
            dir.display()
        );
        return Ok(Outcome::Problem);
    };
    let user_id = account.user_id;
    let mut groups = Vec::new();
    let mut media = 0;
    for (_, shard) in &shards {
        let shard = shard.borrow();
        for group in shard.state().groups.values() {
            if let Some(member) = group.members.iter().find(|m| m.user_id == user_id) {
                groups.push(json!({ "group_id": group.group_id, "epoch": group.epoch,
                                    "members": group.members.len(), "admin": member.admin }));
            }
        }
        media += shard.state().media.values().filter(|m| m.owner == user_id).count();
    }
    groups.sort_by_key(|g| g["group_id"].as_u64());
    let home = &shards[home_shard as usize].1;
    let devices: Vec<Value> = account
        .devices
        .iter()
        .map(|d| {
            json!({
                "device_id": d.device_id, "name": d.name, "created_ms": d.created_ms,
                "one_time_keys": d.one_time_keys.len(), "fallback_key_id": d.fallback_key.key_id,
                "push": d.push.is_some(),
                "queued": home.borrow().mailbox_len((user_id, d.device_id)),
            })
        })
        .collect();
    let report = json!({
        "user_id": user_id, "home_shard": home_shard, "phone": account.phone,
        "created_ms": account.created_ms, "last_seen_ms": account.last_seen_ms,
        "registration_lock": account.registration_lock.is_some(),
        "devices": devices, "groups": groups, "contacts": account.contacts.len(),
        "blocked": account.blocked, "media": media,
        "profile": {
            "display_name": account.profile.display_name.is_some(),
            "about": account.profile.about.is_some(),
            "avatar": account.profile.avatar.is_some(),
        },
    });
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(Outcome::Ok)
}

/// `ternctl reports`: every abuse report, oldest first, one JSON object per line.
pub fn reports(dir: &Path) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    let mut all = Vec::new();
    for (shard_id, shard) in open_all(&data_dir)? {
        for report in &shard.borrow().state().reports {
            all.push((report.time_ms, shard_id, report.clone()));
        }
    }
    all.sort_by_key(|(time, shard, _)| (*time, *shard));
    let mut out = std::io::stdout().lock();
    for (_, _, report) in all {
        let line = json!({
            "time_ms": report.time_ms, "reporter": report.reporter, "reported": report.reported,
            "reason": format!("{:?}", report.reason), "message_ids": report.message_ids,
            "comment": report.comment,
        });
        writeln!(out, "{line}")?;
    }
    Ok(Outcome::Ok)
}

// ---------------------------------------------------------------------------------------
// backup
// ---------------------------------------------------------------------------------------

/// Copies `path` to `to` and syncs it. `Ok(false)` when the source vanished (a live
/// server replaced a checkpoint or reclaimed a segment meanwhile).
fn copy_synced(path: &Path, to: &Path) -> Result<bool, CtlError> {
    match std::fs::copy(path, to) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("copying {}: {e}", path.display()).into()),
    }
    std::fs::File::open(to)?.sync_all()?;
    Ok(true)
}

/// A segment copied while `ternd` appended to it may hold a batch caught half-written
/// followed by a complete later one; recovery would quarantine the half batch as damage.
/// Cut the copy at its first damaged record instead: everything before it (everything
/// acknowledged before the copy began) stays, the rest was never acknowledged by then.
fn cut_at_first_fault(copy: &Path) -> Result<(), CtlError> {
    let cut = {
        let bytes = map(copy)?;
        let scan = scan_segment(&bytes).map_err(|e| format!("{}: {e:?}", copy.display()))?;
        scan.faults.first().map(|f| (f.offset, bytes.len() as u64))
    };
    if let Some((offset, len)) = cut {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(copy)?;
        file.write_all_at(&vec![0; (len - offset) as usize], offset)?;
        file.sync_all()?;
    }
    Ok(())
}

/// Copies one shard: the newest checkpoint, then every segment listed after it. If the
/// newest checkpoint changed meanwhile (the server may then have reclaimed segments the
/// copied checkpoint still needs), the shard is copied again.
fn backup_shard(data_dir: &DataDir, shard_id: u32, dest: &Path) -> Result<(), CtlError> {
    let to_dir = dest.join(format!("shard-{shard_id:04}"));
    for _ in 0..20 {
        if to_dir.exists() {
            std::fs::remove_dir_all(&to_dir)?;
        }
        std::fs::create_dir_all(&to_dir)?;
        let before = shard_files(data_dir, shard_id)?;
        let newest = before.checkpoints.last().cloned();
        if let Some((_, path)) = &newest {
            if !copy_synced(path, &to_dir.join(path.file_name().expect("a file")))? {
                continue;
            }
        }
        let listed = shard_files(data_dir, shard_id)?;
        let mut complete = true;
        let last = listed.segments.keys().next_back().copied();
        for (id, path) in &listed.segments {
            let to = to_dir.join(path.file_name().expect("a file"));
            if !copy_synced(path, &to)? {
                complete = false;
                break;
            }
            // Only the segment being appended can hold a half-written batch; damage in a
            // sealed one is real and stays for `verify` and recovery to report.
            if Some(*id) == last {
                cut_at_first_fault(&to)?;
            }
        }
        let after = shard_files(data_dir, shard_id)?;
        if complete && after.checkpoints.last() == newest.as_ref() {
            std::fs::File::open(&to_dir)?.sync_all()?;
            return Ok(());
        }
    }
    Err(format!("shard {shard_id} kept changing under the copy; try again").into())
}

/// `ternctl backup`: a consistent copy of a data directory, safe while `ternd` runs.
/// Restoring is starting `ternd` on the copy: it holds every message acknowledged before
/// the backup began.
pub fn backup(dir: &Path, dest: &Path) -> Result<Outcome, CtlError> {
    let data_dir = open_data_dir(dir)?;
    if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
        return Err(format!("{} is not empty; back up into a new directory", dest.display()).into());
    }
    std::fs::create_dir_all(dest)?;
    copy_synced(&dir.join("MANIFEST"), &dest.join("MANIFEST"))?;
    let shard_count = data_dir.manifest().shard_count;
    for shard_id in 0..shard_count {
        backup_shard(&data_dir, shard_id, dest)?;
    }
    // The development TLS certificate clients may pin (absent with --tls-cert).
    let tls = dir.join("tls");
    if tls.is_dir() {
        std::fs::create_dir_all(dest.join("tls"))?;
        for entry in std::fs::read_dir(&tls)? {
            let path = entry?.path();
            copy_synced(&path, &dest.join("tls").join(path.file_name().expect("a file")))?;
        }
    }
    // Committed blobs never change; `.part` files are uploads in progress.
    let media = dir.join("media");
    let mut blobs = 0;
    if media.is_dir() {
        std::fs::create_dir_all(dest.join("media"))?;
        for entry in std::fs::read_dir(&media)? {
            let path = entry?.path();
            if path.extension().is_none() && path.is_file() {
                let to = dest.join("media").join(path.file_name().expect("a file"));
                blobs += u64::from(copy_synced(&path, &to)?);
            }
        }
    }
    for synced in [dest.to_path_buf(), dest.join("media"), dest.join("tls")] {
        if synced.is_dir() {
            std::fs::File::open(&synced)?.sync_all()?;
        }
    }
    println!("backed up {shard_count} shards and {blobs} media blobs to {}", dest.display());
    Ok(Outcome::Ok)
}
