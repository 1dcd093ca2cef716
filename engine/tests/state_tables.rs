//! State tables through the log: one-time prekeys are handed out exactly once even across
//! power cuts, and every table survives a restart (replayed or from a checkpoint).

mod common;

use std::collections::HashSet;
use std::io::ErrorKind;

use common::*;
use futures_lite::future::block_on;
use tern_engine::{DeviceRecord, PowerCut, SimStorage, StateOp, WriteError};
use tern_wire::messages::{GroupMember, SignedPrekey};

fn key(key_id: u64) -> SignedPrekey {
    SignedPrekey { key_id, public_key: [key_id as u8; 32], signature: [7; 64] }
}

fn device(device_id: u32, keys: u64) -> DeviceRecord {
    DeviceRecord {
        device_id,
        name: "phone".into(),
        token_hash: [1; 32],
        identity_key: [2; 32],
        signing_key: [3; 32],
        fallback_key: key(1_000_000),
        one_time_keys: (1..=keys).map(key).collect(),
        push: None,
        created_ms: NOW_MS,
    }
}

/// Goal: no one-time prekey is ever handed out twice. Method: claim keys in a loop; a
/// claim counts as handed out only once its record is durable (as the server does);
/// crash at random points, including inside the commit of a claim, and check that no
/// later claim returns a key handed out before.
#[test]
fn one_time_keys_are_handed_out_exactly_once_across_crashes() {
    let mut disk = SimStorage::new(512);
    let shard = open(disk.clone(), small_config());
    shard
        .borrow_mut()
        .apply_state(StateOp::PutAccount { user_id: 1, phone: "+1".into(), created_ms: 0 })
        .unwrap();
    shard
        .borrow_mut()
        .apply_state(StateOp::PutDevice { user_id: 1, device: device(1, 400) })
        .unwrap();
    block_on(shard.commit()).unwrap();
    drop(shard);

    let mut handed_out = HashSet::new();
    let mut state = 12345u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for cycle in 0..150 {
        let shard = open(disk.clone(), small_config());
        for _ in 0..(random() % 4) {
            let claimed = shard.borrow_mut().claim_one_time_key(1, 1).unwrap();
            let Some((key, seq)) = claimed else { break };
            block_on(shard.commit()).unwrap();
            block_on(shard.borrow().durable(seq)).unwrap();
            assert!(
                handed_out.insert(key.key_id),
                "cycle {cycle}: key {} handed out twice",
                key.key_id
            );
        }
        // A claim whose commit fails is never handed out (its waiter gets the error).
        let claimed = shard.borrow_mut().claim_one_time_key(1, 1).unwrap();
        if let Some((_, seq)) = claimed {
            disk.fail_after((random() % 2) as u32, ErrorKind::Other);
            let _ = block_on(shard.commit());
            disk.clear_failure();
            let waited = block_on(shard.borrow().durable(seq));
            assert!(matches!(waited, Err(WriteError::Io { .. })));
        }
        drop(shard);
        let tear = (random() % 3) as usize;
        disk = disk.power_cut(|_, n| match tear {
            0 => PowerCut::DropAll,
            1 => PowerCut::KeepFirst(n),
            _ => PowerCut::Tear { whole: 0, bytes: 700 },
        });
    }
    let shard = open(disk, small_config());
    let left: HashSet<u64> = shard
        .borrow()
        .state()
        .device(1, 1)
        .unwrap()
        .one_time_keys
        .iter()
        .map(|k| k.key_id)
        .collect();
    assert!(left.is_disjoint(&handed_out), "a handed-out key is back in stock");
    assert!(handed_out.len() > 50, "the test claimed too few keys: {}", handed_out.len());
}

#[test]
fn state_tables_survive_restart_with_and_without_checkpoint() {
    let disk = SimStorage::new(1);
    let shard = open(disk.clone(), small_config());
    let ops = [
        StateOp::PutAccount { user_id: 7, phone: "+4915550007".into(), created_ms: 5 },
        StateOp::PutDevice { user_id: 7, device: device(1, 3) },
        StateOp::PutDevice { user_id: 7, device: device(2, 2) },
        StateOp::SetBlocked { user_id: 7, other: 9, blocked: true },
        StateOp::PutGroup {
            group: tern_engine::GroupRecord {
                group_id: 77,
                name: "climbing".into(),
                epoch: 1,
                created_ms: 5,
                members: vec![GroupMember { user_id: 7, admin: true, joined_ms: 5 }],
            },
        },
        StateOp::SetLastSeen { user_id: 7, last_seen_ms: 99 },
        StateOp::RemoveDevice { user_id: 7, device_id: 2 },
    ];
    for op in &ops[..4] {
        shard.borrow_mut().apply_state(op.clone()).unwrap();
    }
    block_on(shard.checkpoint()).unwrap();
    for op in &ops[4..] {
        shard.borrow_mut().apply_state(op.clone()).unwrap();
    }
    block_on(shard.commit()).unwrap();
    let expected = shard.borrow().state().clone();
    drop(shard);

    let shard = open(disk.clone(), small_config());
    assert_eq!(shard.borrow().state(), &expected);
    let account = expected.account(7).unwrap();
    assert_eq!(account.devices.len(), 1);
    assert_eq!(account.blocked, vec![9]);
    assert_eq!(expected.user_by_phone("+4915550007"), Some(7));
    assert_eq!(expected.groups[&77].name, "climbing");
    block_on(shard.checkpoint()).unwrap();
    drop(shard);
    let shard = open(disk, small_config());
    assert_eq!(shard.borrow().state(), &expected);
}
