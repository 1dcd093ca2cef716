//! Pacing (hardening, the abuse run): a connection that makes requests or draws
//! refusals faster than its budgets is not read until a token is back, so a client
//! pipelining at line rate gets its answers at the budget's pace; what it wrote waits in
//! its socket, nothing is dropped. And 1:1 messages to people who never wrote back have
//! a budget of their own. Before these rules every pipelined frame was answered at once
//! and a fleet of accounts could send a victim 50 messages a second each.

use tern_wire::messages::{Conversation, ReceiptKind};
use tern_wire::messages::{DeliveryAck, Ping, SendAck, SendReceipt};
use tern_wire::{ErrorCode, MessageType};

use crate::core::config::CoreConfig;
use crate::core::conns::{PRE_AUTH_REQUEST_RATE, REFUSAL_RATE, REQUEST_RATE};
use crate::sim::peer::{login, register, text, Peer};
use crate::sim::{SimConfig, World};

fn world() -> World {
    World::new(SimConfig { core: CoreConfig::default(), ..SimConfig::default() }, 1)
}

/// Pipelines `count` pings and returns how many were answered once the world settled.
fn pings_answered(world: &mut World, peer: &mut Peer, count: usize) -> usize {
    for _ in 0..count {
        peer.send(world, &Ping { nonce: 7 });
    }
    world.settle();
    peer.take_all(world, MessageType::Pong).len()
}

#[test]
fn pipelined_requests_are_answered_at_the_budgets_pace() {
    let mut world = world();
    // Before auth: the burst (`Hello` took one; the frame that finds the bucket empty
    // is answered on credit), then nothing until time passes.
    let mut stranger = Peer::connect(&mut world);
    let burst = PRE_AUTH_REQUEST_RATE.burst as usize;
    assert_eq!(pings_answered(&mut world, &mut stranger, 100), burst);
    assert!(world.reading_paused(stranger.link), "the rest waits in the socket");
    world.advance(1000);
    world.settle();
    let refill = PRE_AUTH_REQUEST_RATE.per_second as usize;
    assert_eq!(stranger.take_all(&mut world, MessageType::Pong).len(), refill);

    // Authenticated: a bigger burst and rate; acknowledgements are free.
    let alice = register(&mut world, "+15550091", 0);
    let mut a = login(&mut world, &alice);
    for _ in 0..5_000 {
        a.send(&mut world, &DeliveryAck { up_to_mailbox_seq: 0 });
    }
    let burst = REQUEST_RATE.burst as usize;
    assert_eq!(pings_answered(&mut world, &mut a, 2 * burst), burst + 1);
    assert!(world.reading_paused(a.link));
    world.advance(1000);
    world.settle();
    let refill = REQUEST_RATE.per_second as usize;
    assert_eq!(a.take_all(&mut world, MessageType::Pong).len(), refill);
    assert!(world.is_open(a.link), "paced, not closed");
}

#[test]
fn refusals_past_their_budget_pace_the_connection() {
    let mut world = world();
    let alice = register(&mut world, "+15550092", 0);
    let bob = register(&mut world, "+15550093", 0);
    let mut a = login(&mut world, &alice);
    // Read receipts to someone who never wrote to Alice: each is refused.
    let receipt = SendReceipt {
        kind: ReceiptKind::Read,
        to_user: bob.user_id,
        conversation: Conversation::User(bob.user_id),
        message_ids: vec![1],
    };
    for _ in 0..100 {
        a.send(&mut world, &receipt);
    }
    world.settle();
    let refused = a.take_all(&mut world, MessageType::ErrorFrame);
    assert_eq!(refused.len(), REFUSAL_RATE.burst as usize + 1, "the burst, one on credit");
    assert!(refused.iter().all(|r| r.error_code() == Some(ErrorCode::Forbidden)));
    assert!(world.reading_paused(a.link));
    world.advance(1000);
    world.settle();
    let more = a.take_all(&mut world, MessageType::ErrorFrame).len();
    assert_eq!(more, REFUSAL_RATE.per_second as usize);
}

#[test]
fn messages_to_strangers_have_a_budget_until_they_write_back() {
    let mut world = world();
    let alice = register(&mut world, "+15550094", 0);
    let bob = register(&mut world, "+15550095", 0);
    let mut a = login(&mut world, &alice);
    let burst = CoreConfig::default().stranger_send_rate.burst as u64;
    for id in 1..=burst {
        a.request(&mut world, &text(&bob, id, b"hello?")).access::<SendAck>();
    }
    let refused = a.request(&mut world, &text(&bob, burst + 1, b"hello??"));
    assert_eq!(refused.error_code(), Some(ErrorCode::RateLimited), "{}", refused.describe());
    assert!(refused.describe().contains("never wrote"), "{}", refused.describe());
    // Bob writes back: Alice is talking to an acquaintance now, under the send rate only.
    let mut b = login(&mut world, &bob);
    b.request(&mut world, &text(&alice, 1, b"who is this?")).access::<SendAck>();
    a.request(&mut world, &text(&bob, burst + 2, b"Alice!")).access::<SendAck>();
}
