//! The engine's basic contract on real files: appended envelopes become readable only
//! once committed, read back as the exact bytes appended, in order, survive a restart,
//! fan out to many mailboxes from one record, and go away when acknowledged.

mod common;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{StateOp, StdStorage};
use tern_wire::encode_archive;

#[test]
fn append_commit_read_ack_restart() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StdStorage::new(dir.path()).unwrap();
    let shard = open(storage.clone(), small_config());
    let alice = (10, 1);
    let bob = (11, 1);

    let mut stored = Vec::new();
    for i in 0..50u64 {
        let body = format!("message {i}").into_bytes();
        let envelope = envelope(20, i + 1, 1000 + i, &body);
        let mut expected = Vec::new();
        encode_archive(&mut expected, &envelope).unwrap();
        stored.push(expected);
        let appended = shard.borrow_mut().append_envelope(&envelope, &[alice, bob]).unwrap();
        assert_eq!(appended.mailbox_seqs, vec![i, i]);
        if i == 0 {
            // Not durable yet: not served.
            assert!(read_all(&shard, alice).is_empty());
        }
        block_on(shard.commit()).unwrap();
    }

    // Reads hand out the exact bytes laid out at append time.
    {
        let borrowed = shard.borrow();
        let read = borrowed.read_mailbox(alice, 0, 100, NOW_MS);
        assert_eq!(read.entries.len(), 50);
        for (entry, expected) in read.entries.iter().zip(&stored) {
            assert_eq!(entry.envelope, &expected[..]);
        }
        let page = borrowed.read_mailbox(alice, 10, 5, NOW_MS);
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.mailbox_seq).collect();
        assert_eq!(seqs, vec![10, 11, 12, 13, 14]);
    }
    assert_eq!(shard.borrow().lookup_send(20, 1, 7), Some(1006));

    // Alice acks 30; Bob nothing.
    assert_eq!(shard.borrow_mut().ack(alice, 29).unwrap(), 30);
    block_on(shard.commit()).unwrap();
    assert_eq!(read_all(&shard, alice).len(), 20);
    assert_eq!(read_all(&shard, alice)[0].0, 30);

    shard
        .borrow_mut()
        .apply_state(StateOp::PutAccount { user_id: 10, phone: "+15550100".into(), created_ms: 1 })
        .unwrap();
    block_on(shard.commit()).unwrap();
    drop(shard);

    // Restart: everything committed is back.
    let shard = open(storage, small_config());
    assert_eq!(read_all(&shard, alice).len(), 20);
    assert_eq!(read_all(&shard, bob).len(), 50);
    assert_eq!(read_all(&shard, bob)[49].1, b"message 49");
    assert_eq!(shard.borrow().state().user_by_phone("+15550100"), Some(10));
    assert_eq!(shard.borrow().lookup_send(20, 1, 7), Some(1006));
    assert_eq!(shard.borrow().mailbox_next_seq(alice), 50);

    // New appends continue the sequences.
    let appended =
        shard.borrow_mut().append_envelope(&envelope(20, 99, 5000, b"after"), &[alice]).unwrap();
    assert_eq!(appended.mailbox_seqs, vec![50]);
    block_on(shard.commit()).unwrap();
    assert_eq!(read_all(&shard, alice).last().unwrap(), &(50, b"after".to_vec()));
}

#[test]
fn many_appends_in_one_commit_roll_segments() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StdStorage::new(dir.path()).unwrap();
    let shard = open(storage.clone(), small_config());
    let device = (1, 1);
    let body = [7u8; 300];
    for round in 0..5u64 {
        for i in 0..200u64 {
            let id = round * 1000 + i + 1;
            shard.borrow_mut().append_envelope(&envelope(2, id, id, &body), &[device]).unwrap();
        }
        block_on(shard.commit()).unwrap();
    }
    assert_eq!(read_all(&shard, device).len(), 1000);
    let segments = storage.path().read_dir().unwrap().count();
    assert!(segments > 3, "64 KiB segments should have rolled: {segments} files");
    drop(shard);
    let shard = open(storage, small_config());
    let all = read_all(&shard, device);
    assert_eq!(all.len(), 1000);
    assert!(all.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64));
}

#[test]
fn mailbox_bytes_follow_appends_acks_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StdStorage::new(dir.path()).unwrap();
    let shard = open(storage.clone(), small_config());
    let alice = (10, 1);
    for i in 0..20u64 {
        let body = vec![b'x'; 100 + i as usize];
        shard
            .borrow_mut()
            .append_envelope(&envelope(20, i + 1, 1000 + i, &body), &[alice])
            .unwrap();
    }
    block_on(shard.commit()).unwrap();
    let full = shard.borrow_mut().mailbox_bytes(alice);
    assert!(full > 20 * 100, "{full}");
    assert_eq!(shard.borrow().mailbox_head_seq(alice), 0);
    shard.borrow_mut().ack(alice, 9).unwrap();
    block_on(shard.commit()).unwrap();
    let half = shard.borrow_mut().mailbox_bytes(alice);
    assert!(half < full && half > 0, "{half} of {full}");
    assert_eq!(shard.borrow().mailbox_head_seq(alice), 10);
    // After a checkpoint and a restart the sum is the same (computed on first use).
    block_on(shard.checkpoint()).unwrap();
    drop(shard);
    let shard = open(storage, small_config());
    assert_eq!(shard.borrow_mut().mailbox_bytes(alice), half);
    shard.borrow_mut().ack(alice, 19).unwrap();
    assert_eq!(shard.borrow_mut().mailbox_bytes(alice), 0);
}

#[test]
fn sender_shares_follow_appends_acks_removals_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StdStorage::new(dir.path()).unwrap();
    let shard = open(storage.clone(), small_config());
    let alice = (10, 1);
    let (flooder, friend) = (20, 30);
    for i in 0..12u64 {
        let sender = if i % 3 == 0 { friend } else { flooder };
        let body = vec![b'x'; 100];
        let envelope = envelope(sender, i + 1, 1000 + i, &body);
        shard.borrow_mut().append_envelope(&envelope, &[alice]).unwrap();
    }
    block_on(shard.commit()).unwrap();
    let share = |shard: &tern_engine::ShardHandle<StdStorage>, sender| {
        shard.borrow_mut().mailbox_sender_share(alice, sender)
    };
    assert_eq!((share(&shard, flooder).entries, share(&shard, friend).entries), (8, 4));
    let bytes = shard.borrow_mut().mailbox_bytes(alice);
    assert_eq!(share(&shard, flooder).bytes + share(&shard, friend).bytes, bytes);
    // Acks release both senders' entries: 0..=5 holds two of the friend's, four others.
    shard.borrow_mut().ack(alice, 5).unwrap();
    assert_eq!((share(&shard, flooder).entries, share(&shard, friend).entries), (4, 2));
    // A removal (deleted for everyone) releases one.
    let seq = shard.borrow().find_queued(alice, flooder, 1007).unwrap();
    shard.borrow_mut().remove_queued(alice, seq).unwrap();
    block_on(shard.commit()).unwrap();
    assert_eq!(share(&shard, flooder).entries, 3);
    // After a checkpoint and a restart the shares are counted again from the records.
    block_on(shard.checkpoint()).unwrap();
    drop(shard);
    let shard = open(storage, small_config());
    assert_eq!((share(&shard, flooder).entries, share(&shard, friend).entries), (3, 2));
    shard.borrow_mut().ack(alice, 11).unwrap();
    assert_eq!(share(&shard, flooder), tern_engine::SenderShare::default());
    assert_eq!(shard.borrow_mut().mailbox_bytes(alice), 0);
}

#[test]
fn a_removed_envelope_is_never_served_again_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StdStorage::new(dir.path()).unwrap();
    let shard = open(storage.clone(), small_config());
    let (alice, bob) = ((10, 1), (11, 1));
    for i in 0..5u64 {
        let body = format!("m{i}");
        let envelope = envelope(20, i + 1, 1000 + i, body.as_bytes());
        shard.borrow_mut().append_envelope(&envelope, &[alice, bob]).unwrap();
    }
    block_on(shard.commit()).unwrap();
    // Message ids are allocated by the test helper: find the third by its id.
    let third_id = {
        let borrowed = shard.borrow();
        let read = borrowed.read_mailbox(alice, 2, 1, NOW_MS);
        let envelope =
            rkyv::access::<tern_wire::messages::ArchivedEnvelope, rkyv::rancor::Failure>(
                read.entries[0].envelope,
            )
            .unwrap();
        envelope.server_message_id.to_native()
    };
    let seq = shard.borrow().find_queued(alice, 20, third_id).unwrap();
    assert_eq!(seq, 2);
    assert!(shard.borrow().find_queued(alice, 21, third_id).is_none(), "another sender's id");
    assert!(shard.borrow_mut().remove_queued(alice, seq).unwrap().is_some());
    assert!(shard.borrow_mut().remove_queued(alice, seq).unwrap().is_none(), "once");
    block_on(shard.commit()).unwrap();
    let texts = |shard: &tern_engine::ShardHandle<StdStorage>, device| -> Vec<Vec<u8>> {
        read_all(shard, device).into_iter().map(|(_, body)| body).collect()
    };
    let without: Vec<Vec<u8>> = [0, 1, 3, 4].iter().map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(texts(&shard, alice), without);
    assert_eq!(texts(&shard, bob).len(), 5, "only Alice's copy was removed");
    drop(shard);
    // Replayed from the log.
    let shard = open(storage.clone(), small_config());
    assert_eq!(texts(&shard, alice), without);
    // And from a checkpoint.
    block_on(shard.checkpoint()).unwrap();
    drop(shard);
    let shard = open(storage, small_config());
    assert_eq!(texts(&shard, alice), without);
    assert!(shard.borrow().find_queued(alice, 20, third_id).is_none());
    // Acking past the removed entry works as usual.
    shard.borrow_mut().ack(alice, 4).unwrap();
    assert!(read_all(&shard, alice).is_empty());
}

/// A mailbox ack answers nobody, so it asks for no commit of its own (it rides with the
/// next one); an envelope does. An ack lost to a power cut before that commit only
/// delivers again what the device had acknowledged.
#[test]
fn an_ack_alone_asks_for_no_commit_and_a_lost_one_redelivers() {
    let disk = tern_engine::SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    let device = (42, 1);
    let sent = envelope(7, 1, 100, b"hello");
    shard.borrow_mut().append_envelope(&sent, &[device]).unwrap();
    assert!(shard.borrow().needs_commit(), "an envelope is awaited");
    block_on(shard.commit()).unwrap();

    shard.borrow_mut().ack(device, 0).unwrap();
    assert!(shard.borrow().has_pending(), "the ack waits for a commit");
    assert!(!shard.borrow().needs_commit(), "but starts none");
    assert!(read_all(&shard, device).is_empty(), "acknowledged: gone from the mailbox");

    // Power cut before any commit took the ack: the envelope is delivered again.
    drop(shard);
    let after = disk.power_cut(|_, _| tern_engine::PowerCut::DropAll);
    let shard = open(after.clone(), small_config());
    assert_eq!(read_all(&shard, device).len(), 1);

    // The next envelope's commit carries an ack appended before it.
    shard.borrow_mut().ack(device, 0).unwrap();
    shard.borrow_mut().append_envelope(&envelope(7, 2, 101, b"again"), &[device]).unwrap();
    assert!(shard.borrow().needs_commit());
    block_on(shard.commit()).unwrap();
    assert!(!shard.borrow().has_pending());
    drop(shard);
    let shard = open(after.power_cut(|_, _| tern_engine::PowerCut::DropAll), small_config());
    let left: Vec<Vec<u8>> = read_all(&shard, device).into_iter().map(|(_, b)| b).collect();
    assert_eq!(left, vec![b"again".to_vec()]);
}
