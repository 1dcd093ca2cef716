//! Quotas on what one account can create, and the disk reserve (hardening, issue 20
//! item 5), against the simulated server with the clock moved by hand: uploads in
//! progress and media bytes held, exports, reports and groups per day, presence
//! subscriptions, and what is refused while free disk space is under the reserve. The
//! quotas on contacts, blocks and message ids per report are in `rules.rs`
//! (`account_quotas_refuse_what_is_over_them`); the reserve and a full disk against the
//! real binary on a small file system are in `edge/tests/disk.rs`.

use tern_wire::messages::{
    CodeSent, Done, ErrorFrame, ExportReady, ExportRequest, GroupChange, GroupUpdated, MediaBegin,
    MediaBegun, MediaChunk, MediaKind, PresenceSubscribe, Report, ReportReason, SendAck,
};
use tern_wire::ErrorCode;

use crate::core::accounts::REPORTS_PER_DAY_MAX;
use crate::core::config::CoreConfig;
use crate::core::export::EXPORTS_PER_DAY_MAX;
use crate::core::groups::GROUPS_CREATED_PER_DAY_MAX;
use crate::core::media::UPLOADS_IN_PROGRESS_MAX;
use crate::sim::peer::{self, login, register, signed_update, text, Peer};
use crate::sim::{Received, SimConfig, World};

const DAY_MS: u64 = 24 * 3600 * 1000;

fn world_with(core: CoreConfig) -> World {
    World::new(SimConfig { core, ..SimConfig::default() }, 1)
}

#[track_caller]
fn refused(answer: &Received, code: ErrorCode, text: &str) {
    assert_eq!(answer.error_code(), Some(code), "{}", answer.describe());
    assert!(answer.describe().contains(text), "{}", answer.describe());
}

fn begin(size_bytes: u64) -> MediaBegin {
    MediaBegin { size_bytes, kind: MediaKind::Document }
}

/// Under the disk reserve the server takes no new account, upload (begun or under way)
/// or export — each refused `StorageFull` with the reserve's reason and a minute's
/// retry hint — while messages are still stored and a registered number may still ask
/// for a code (moving to a new phone adds no account). Once free space is back, all of
/// it works again. Before, there was no reserve: uploads took the last free bytes.
#[test]
fn under_the_disk_reserve_only_messages_are_stored() {
    let reserve_bytes = 1 << 30;
    let mut world =
        world_with(CoreConfig { disk_reserve_bytes: reserve_bytes, ..Default::default() });
    world.set_free_disk_bytes(10 * reserve_bytes);
    let alice = register(&mut world, "+15550301", 0);
    let bob = register(&mut world, "+15550302", 0);
    let mut a = login(&mut world, &alice);
    let media_id = a.request(&mut world, &begin(1000)).access::<MediaBegun>().media_id;

    world.set_free_disk_bytes(reserve_bytes - 1);
    let reason = "keeps its last free disk space for messages";
    let mut c = Peer::connect(&mut world);
    let new_account = c.request(&mut world, &peer::request_code("+15550303"));
    refused(&new_account, ErrorCode::StorageFull, reason);
    assert_eq!(new_account.access::<ErrorFrame>().retry_after_ms.to_native(), 60_000);
    refused(&a.request(&mut world, &begin(1000)), ErrorCode::StorageFull, reason);
    let chunk = MediaChunk { media_id, offset: 0, data: vec![7; 100] };
    refused(&a.request(&mut world, &chunk), ErrorCode::StorageFull, reason);
    refused(&a.request(&mut world, &ExportRequest {}), ErrorCode::StorageFull, reason);
    a.request(&mut world, &text(&bob, 1, b"still stored")).access::<SendAck>();
    c.request(&mut world, &peer::request_code("+15550301")).access::<CodeSent>();

    world.set_free_disk_bytes(reserve_bytes);
    register(&mut world, "+15550303", 0);
    a.request(&mut world, &begin(1000)).access::<MediaBegun>();
    a.request(&mut world, &ExportRequest {}).access::<ExportReady>();
}

/// An account has at most 16 uploads in progress, counted from the request: 17
/// pipelined `MediaBegin`s get 16 ids and one `QuotaExceeded` (a check against the
/// stored records alone would let them all pass). It holds at most
/// `media_account_max_bytes` of media, uploads in progress at their declared size; what
/// expires gives its share back. Before, neither had a bound.
#[test]
fn an_account_holds_bounded_uploads_and_media_bytes() {
    let max_bytes = 100_000;
    let mut world =
        world_with(CoreConfig { media_account_max_bytes: max_bytes, ..Default::default() });
    let alice = register(&mut world, "+15550311", 0);
    let mut a = login(&mut world, &alice);
    let asked: Vec<u32> =
        (0..=UPLOADS_IN_PROGRESS_MAX).map(|_| a.send(&mut world, &begin(100))).collect();
    world.settle();
    let answers: Vec<Received> =
        asked.iter().map(|id| a.response(&mut world, *id).expect("an answer")).collect();
    let over: Vec<&Received> = answers.iter().filter(|r| r.error_code().is_some()).collect();
    assert_eq!(over.len(), 1, "{:?}", answers.iter().map(Received::describe).collect::<Vec<_>>());
    refused(over[0], ErrorCode::QuotaExceeded, "uploads in progress");

    // A day later the uncommitted uploads have expired and given their share back.
    world.advance(DAY_MS + 1);
    world.maintain();
    let mut a = login(&mut world, &alice);
    a.request(&mut world, &begin(max_bytes - 1_000)).access::<MediaBegun>();
    refused(&a.request(&mut world, &begin(1_001)), ErrorCode::QuotaExceeded, "bytes of media");
    a.request(&mut world, &begin(1_000)).access::<MediaBegun>();
}

/// One export in progress per account and three a day: a second export asked while
/// the first is made is refused, the fourth of a day too, and the next day there are
/// three again. Before, every request serialized the account and stored a blob.
#[test]
fn exports_are_one_at_a_time_and_three_a_day() {
    let mut world = world_with(CoreConfig::default());
    let alice = register(&mut world, "+15550321", 0);
    let mut a = login(&mut world, &alice);
    let first = a.send(&mut world, &ExportRequest {});
    let second = a.send(&mut world, &ExportRequest {});
    world.settle();
    a.response(&mut world, first).expect("an answer").access::<ExportReady>();
    let second = a.response(&mut world, second).expect("an answer");
    refused(&second, ErrorCode::QuotaExceeded, "exports in progress");
    for _ in 1..EXPORTS_PER_DAY_MAX {
        a.request(&mut world, &ExportRequest {}).access::<ExportReady>();
    }
    refused(&a.request(&mut world, &ExportRequest {}), ErrorCode::QuotaExceeded, "exports today");
    world.advance(DAY_MS);
    let mut a = login(&mut world, &alice);
    a.request(&mut world, &ExportRequest {}).access::<ExportReady>();
}

/// An account files at most 50 reports in 24 hours, counted from the stored reports
/// (so a restart does not reset it). The request budget alone (10, then one a minute
/// per device) let a device store about 1,450 a day, kept for good.
#[test]
fn an_account_files_a_bounded_number_of_reports_a_day() {
    let mut world = world_with(CoreConfig::default());
    let alice = register(&mut world, "+15550331", 0);
    let report = Report {
        user_id: 1 << 48,
        message_ids: vec![1],
        reason: ReportReason::Spam,
        comment: "x".into(),
    };
    let mut a = login(&mut world, &alice);
    for _ in 0..REPORTS_PER_DAY_MAX {
        world.advance(60_000); // the budget's refill
        a.request(&mut world, &report).access::<Done>();
    }
    world.advance(60_000);
    refused(&a.request(&mut world, &report), ErrorCode::QuotaExceeded, "reports in 24 hours");
    world.power_cut(); // the count is the stored reports: a restart does not reset it
    let mut a = login(&mut world, &alice);
    refused(&a.request(&mut world, &report), ErrorCode::QuotaExceeded, "reports in 24 hours");
    world.advance(DAY_MS);
    let mut a = login(&mut world, &alice);
    a.request(&mut world, &report).access::<Done>();
}

/// An account creates at most 20 groups a day; a creation the group's core refuses
/// (the id taken) does not count; the next day there are 20 again. Before, only the
/// group-change budget (30, then one a second) bounded them.
#[test]
fn an_account_creates_a_bounded_number_of_groups_a_day() {
    let mut world = world_with(CoreConfig::default());
    let alice = register(&mut world, "+15550341", 0);
    let mut a = login(&mut world, &alice);
    let create = |group_id: u64| {
        let change = GroupChange::Create { name: "g".into(), members: Vec::new() };
        signed_update(&alice, group_id, 0, change)
    };
    for group_id in 1..=u64::from(GROUPS_CREATED_PER_DAY_MAX) {
        a.request(&mut world, &create(group_id)).access::<GroupUpdated>();
        if group_id == 1 {
            // The same id again: refused by the group's core, given back.
            let taken = a.request(&mut world, &create(group_id));
            assert_eq!(taken.error_code(), Some(ErrorCode::Conflict), "{}", taken.describe());
        }
    }
    let over = a.request(&mut world, &create(1_000));
    refused(&over, ErrorCode::QuotaExceeded, "groups created today");
    world.advance(DAY_MS);
    let mut a = login(&mut world, &alice);
    a.request(&mut world, &create(1_001)).access::<GroupUpdated>();
}

/// Presence subscriptions: an account follows at most 5,000 users (a subscription
/// replaces the account's list, whichever device sends it), and a device subscribes
/// at most 10 times at once, then once every 10 s (each subscription changes watches
/// on every core). Before, subscriptions had no budget: a device alternating two lists
/// of 5,000 made every core add and drop 5,000 watches per frame.
#[test]
fn presence_subscriptions_are_bounded() {
    let mut world = world_with(CoreConfig::default());
    let alice = register(&mut world, "+15550351", 0);
    let mut a = login(&mut world, &alice);
    let follow = |n: u64| PresenceSubscribe { user_ids: (1..=n).map(|i| (1 << 48) | i).collect() };
    refused(&a.request(&mut world, &follow(5_001)), ErrorCode::TooLarge, "too many users");
    for _ in 1..10 {
        a.request(&mut world, &follow(5_000)).access::<Done>();
    }
    let again = a.request(&mut world, &follow(5_000));
    refused(&again, ErrorCode::RateLimited, "presence subscriptions");
    world.advance(10_000);
    a.request(&mut world, &follow(5_000)).access::<Done>();
}
