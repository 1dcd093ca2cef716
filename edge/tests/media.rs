//! Media against the real `ternd` on two cores: a 50 MiB upload cut halfway and resumed
//! where the server says, a wrong hash refused, an oversized file refused at once, the
//! download by a recipient on the other core byte-identical, a non-recipient refused,
//! flat server memory, and expiry.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use tern_edge::routing::home_shard_of_phone;
use tern_wire::messages::*;
use tern_wire::*;

const SIZE: usize = 50 << 20;
const CHUNK: usize = 256 * 1024;

fn phone_on_core(base: u64, core: u32) -> String {
    (base..)
        .map(|n| format!("+1567{n:07}"))
        .find(|p| home_shard_of_phone(p, 4) % 2 == core)
        .unwrap()
}

/// Deterministic stand-in for a client-encrypted blob.
fn blob(size: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn send_chunks(client: &mut Client, media_id: MediaId, data: &[u8], from: usize, to: usize) {
    let mut offset = from;
    while offset < to {
        let end = (offset + CHUNK).min(to);
        let chunk =
            MediaChunk { media_id, offset: offset as u64, data: data[offset..end].to_vec() };
        client.send(&chunk);
        offset = end;
    }
}

fn status(client: &mut Client, media_id: MediaId) -> (u64, bool) {
    let reply = client.request(&MediaStatusRequest { media_id });
    let status = reply.access::<MediaStatus>();
    (status.received_bytes.to_native(), status.committed)
}

#[test]
fn a_big_upload_resumes_and_downloads_byte_identical() {
    let dir = data_dir();
    let mut server = Server::start(dir.path(), &["--cores", "2", "--media-max-bytes", "60000000"]);
    let alice = register(&mut server, &phone_on_core(100, 0), 0);
    let bob = register(&mut server, &phone_on_core(200, 1), 0);
    let carol = register(&mut server, &phone_on_core(300, 1), 0);
    let data = blob(SIZE);
    let rss_before = server.rss_kib();

    let mut a = login(&server, alice);
    let too_big = a.request(&MediaBegin { size_bytes: 70_000_000, kind: MediaKind::Video });
    assert_eq!(too_big.error_code(), Some(ErrorCode::TooLarge));
    let begun = a.request(&MediaBegin { size_bytes: SIZE as u64, kind: MediaKind::Document });
    let begun = begun.access::<MediaBegun>();
    let media_id = begun.media_id;
    assert_eq!(begun.chunk_bytes.to_native() as usize, CHUNK);

    // Half the file, then the connection dies.
    send_chunks(&mut a, media_id, &data, 0, SIZE / 2);
    drop(a);
    let mut a = login(&server, alice);
    let (received, committed) = status(&mut a, media_id);
    assert!(!committed);
    assert!(received as usize <= SIZE / 2 && received > 0, "{received}");
    // A chunk at the wrong offset is refused; the rest resumes where the server says.
    let wrong = MediaChunk { media_id, offset: received + 1, data: vec![0; 10] };
    assert_eq!(a.request(&wrong).error_code(), Some(ErrorCode::Conflict));
    send_chunks(&mut a, media_id, &data, received as usize, SIZE);
    assert_eq!(status(&mut a, media_id), (SIZE as u64, false));
    let rss_during = server.rss_kib();

    let bad = a.request(&MediaCommit { media_id, sha256: [7; 32] });
    assert_eq!(bad.error_code(), Some(ErrorCode::HashMismatch));
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let done = a.request(&MediaCommit { media_id, sha256 });
    assert!(done.access::<MediaStatus>().committed);

    // Bob gets a media message naming it; Carol does not.
    let mut copy = media_id.to_vec();
    copy.extend_from_slice(b"(E2E ciphertext with the key and the hash)");
    let mut message = text(bob, 1, &copy);
    message.kind = EnvelopeKind::Media;
    a.request(&message).access::<SendAck>();
    let mut c = login(&server, carol);
    let refused = c.request(&MediaDownload { media_id, offset: 0, length: 1024 });
    assert_eq!(refused.error_code(), Some(ErrorCode::NotFound));
    let mut guessed = media_id;
    guessed[15] ^= 1;
    let mut b = login(&server, bob);
    let nothing = b.request(&MediaDownload { media_id: guessed, offset: 0, length: 1024 });
    assert_eq!(nothing.error_code(), Some(ErrorCode::NotFound));

    let mut downloaded = Vec::with_capacity(SIZE);
    while downloaded.len() < SIZE {
        let reply = b.request(&MediaDownload {
            media_id,
            offset: downloaded.len() as u64,
            length: 1 << 20,
        });
        let part = reply.access::<MediaData>();
        assert_eq!(part.total_bytes.to_native() as usize, SIZE);
        assert!(!part.data.is_empty());
        downloaded.extend_from_slice(&part.data);
    }
    assert!(downloaded == data, "the download differs from the upload");
    // Memory stayed flat: a few chunks, not the file.
    let growth_mib = rss_during.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 32, "server memory grew {growth_mib} MiB during a 50 MiB upload");
}

#[test]
fn media_is_deleted_after_its_time() {
    let dir = data_dir();
    let args = ["--media-ttl-s", "1", "--maintenance-interval-s", "0.3"];
    let mut server = Server::start(dir.path(), &args);
    let alice = register(&mut server, "+15670000001", 0);
    let mut a = login(&server, alice);
    let data = blob(1000);
    let begun = a.request(&MediaBegin { size_bytes: 1000, kind: MediaKind::Audio });
    let media_id = begun.access::<MediaBegun>().media_id;
    a.send(&MediaChunk { media_id, offset: 0, data: data.clone() });
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    a.request(&MediaCommit { media_id, sha256 }).access::<MediaStatus>();
    let file = dir
        .path()
        .join("media")
        .join(media_id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert!(file.exists());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while file.exists() {
        assert!(std::time::Instant::now() < deadline, "the blob was never deleted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let gone = a.request(&MediaDownload { media_id, offset: 0, length: 10 });
    assert_eq!(gone.error_code(), Some(ErrorCode::NotFound));
}
