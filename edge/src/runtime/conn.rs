//! One task per connection: socket → layers → `FrameDecoder` → `Core::handle_frame`,
//! and the core's output → layers → socket.
//!
//! The task keeps no protocol state and no timer: the core holds the connection's
//! output, its deadlines and whether it closes; the task registers its waker, writes
//! what the core has, reads when the core wants input, and stops when the core says
//! the connection is gone. A connection whose registration or auth belongs to another
//! core ([`Core::route`]) is flushed and handed over with its undecoded bytes.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use tern_wire::FrameDecoder;

use super::ctx::{now, Ctx};
use super::wire::{Wire, LAYERED_BYTES_MAX};
use super::{socket_handoff, HandOff};
use crate::core::conns::ConnId;

enum Event {
    Read(usize),
    Wrote(usize),
    /// The core caught up: frames held in the decoder may be handled now.
    Resume,
    Closed,
}

/// What a connection task waits for.
#[derive(Clone, Copy)]
enum Wait {
    /// Output, input, or (with `held`) the core catching up with the frames held back.
    Anything { held: bool },
    /// Only for the output to go out.
    Flush,
}

/// Moves bytes for one connection until it closes or moves to another core. `unread`:
/// frame bytes already received (from the core that handed the connection over).
///
/// A plain function returning an `async move` block, not an `async fn`: an `async fn`
/// keeps each argument twice in its task (the captured argument and the body's binding
/// of it), and a task lives as long as its connection.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub fn connection(
    ctx: Rc<Ctx>,
    conn: ConnId,
    mut stream: TcpStream,
    mut wire: Wire,
    unread: Vec<u8>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut decoder = FrameDecoder::new(ctx.core.borrow().max_frame_bytes(conn));
        let mut frames = Vec::new();
        let (mut moving_to, mut held) = (None, false);
        if !unread.is_empty() {
            decoder.feed(&unread);
            (moving_to, held) = handle_frames(&ctx, conn, &mut decoder);
        }
        drop(unread); // Not kept in the task for the connection's life.
        while moving_to.is_none() {
            let wait = Wait::Anything { held };
            let event = std::future::poll_fn(|cx| {
                let mut buffer = ctx.read_buffer.borrow_mut();
                poll_connection(&ctx, conn, &mut stream, &mut wire, &mut buffer, cx, wait)
            })
            .await;
            match event {
                Event::Read(n) => {
                    let buffer = ctx.read_buffer.borrow();
                    let bytes = match wire.received(&buffer[..n], &mut frames) {
                        Ok(bytes) => bytes,
                        Err(error) => {
                            drop(buffer);
                            layer_failed(&ctx, conn, &mut wire, error);
                            continue;
                        }
                    };
                    decoder.feed(bytes);
                    drop(buffer);
                    // The layers' scratch space is used within this read only.
                    release_if_empty(&mut frames);
                    release_if_empty(&mut wire.inner);
                    (moving_to, held) = handle_frames(&ctx, conn, &mut decoder);
                    decoder.release_if_drained();
                }
                Event::Resume => {
                    (moving_to, held) = handle_frames(&ctx, conn, &mut decoder);
                    decoder.release_if_drained();
                }
                Event::Wrote(n) => wrote(&ctx, conn, &mut wire, n),
                Event::Closed => break,
            }
        }
        ctx.wakers.borrow_mut().remove(&conn);
        if let Some(to) = moving_to {
            // Boxed: a hand-over is rare, and inline its state (a second socket, wire and
            // decoder) would double every connection task's size.
            return Box::pin(hand_over(&ctx, conn, stream, wire, decoder, to)).await;
        }
        ctx.core.borrow_mut().handle_closed(conn, now());
        ctx.kick();
    }
}

/// A TLS or WebSocket error: a WebSocket message over the frame limit gets the typed
/// error a frame over the limit gets on a bare stream; anything else sends the layer's
/// alert (already queued) and closes.
fn layer_failed(ctx: &Rc<Ctx>, conn: ConnId, wire: &mut Wire, error: std::io::Error) {
    let mut core = ctx.core.borrow_mut();
    if let Some(too_large) = crate::websocket::MessageTooLarge::of(&error) {
        let max = too_large.max_bytes.min(u64::from(u32::MAX)) as u32;
        let error = tern_wire::DecodeError::FrameTooLarge {
            frame_bytes: too_large.bytes,
            max_frame_bytes: max,
        };
        core.handle_malformed(conn, error, now());
    } else {
        tracing::debug!(%error, "TLS error; closing");
        wire.failed = true;
        core.handle_transport_failed(conn, now());
    }
    drop(core);
    ctx.kick();
}

/// Flushes what was said so far (the other core's output must follow it), then moves
/// the socket and the bytes not handled yet to core `to`.
async fn hand_over(
    ctx: &Rc<Ctx>,
    conn: ConnId,
    stream: TcpStream,
    mut wire: Wire,
    mut decoder: FrameDecoder,
    to: u32,
) {
    let mut stream = stream;
    let flushed = flush(ctx, conn, &mut stream, &mut wire).await;
    let session = ctx.core.borrow_mut().hand_off(conn);
    let (true, Some(session)) = (flushed, session) else {
        ctx.core.borrow_mut().handle_closed(conn, now());
        return ctx.kick();
    };
    match socket_handoff::detach(stream) {
        Ok(socket) => {
            let unread = decoder.take_buffered();
            tracing::debug!(to, unread = unread.len(), "handing a connection over");
            ctx.leaving.borrow_mut().push((to, HandOff { socket, wire, unread, session }));
            ctx.mesh_needed.notify();
        }
        Err(error) => tracing::warn!(%error, "could not hand a connection over"),
    }
}

/// Handles every whole frame the decoder holds. Returns the core the connection must
/// move to if a frame belongs there (that frame and the rest stay in the decoder), and
/// whether frames were held back because the core is behind (an upload's queue is full).
fn handle_frames(ctx: &Rc<Ctx>, conn: ConnId, decoder: &mut FrameDecoder) -> (Option<u32>, bool) {
    let mut core = ctx.core.borrow_mut();
    let now = now();
    let (mut moving, mut held) = (None, false);
    loop {
        decoder.set_max_frame_bytes(core.max_frame_bytes(conn));
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                if let Some(to) = core.route(conn, &frame.message) {
                    moving = Some((to, frame.header.frame_bytes()));
                    break;
                }
                core.handle_frame(conn, &frame, now);
                if core.is_closing(conn) {
                    break;
                }
                if core.reading_paused(conn) {
                    held = true; // The rest waits in the decoder until the core catches up.
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => {
                core.handle_malformed(conn, error, now);
                break;
            }
        }
    }
    drop(core);
    ctx.kick();
    let Some((to, frame_bytes)) = moving else { return (None, held) };
    decoder.unread(frame_bytes);
    (Some(to), false)
}

/// The socket took `n` bytes of pending output.
fn wrote(ctx: &Rc<Ctx>, conn: ConnId, wire: &mut Wire, n: usize) {
    if wire.is_layered() {
        wire.out.drain(..n);
        release_if_empty(&mut wire.out);
        release_if_empty(&mut wire.layered);
    } else {
        ctx.core.borrow_mut().consume_output(conn, n, now());
    }
    ctx.kick();
}

/// Frees an empty buffer's memory. A connection's buffers grow to its largest burst (a
/// TLS handshake flight, a mailbox drained at reconnect); an idle connection keeps none
/// of it. Costs one allocation when the buffer is next used, against a syscall per
/// write or read.
fn release_if_empty(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > 0 {
        *buffer = Vec::new();
    }
}

/// Writes all pending output (reading nothing) until it is out or the socket fails (the
/// core aborts a connection that takes too long). Returns whether everything went out.
async fn flush(ctx: &Rc<Ctx>, conn: ConnId, stream: &mut TcpStream, wire: &mut Wire) -> bool {
    let mut buffer = [0u8; 0];
    loop {
        let pending = wire.out.len() + ctx.core.borrow().output(conn).len() + wire.layered.len();
        if pending == 0 {
            return true;
        }
        let event = std::future::poll_fn(|cx| {
            poll_connection(ctx, conn, stream, wire, &mut buffer, cx, Wait::Flush)
        })
        .await;
        match event {
            Event::Wrote(n) => wrote(ctx, conn, wire, n),
            Event::Read(_) | Event::Resume => {}
            Event::Closed => return false,
        }
    }
}

/// One step of a connection: write pending output if the socket takes it, else (unless
/// flushing, or the core is behind) read.
fn poll_connection(
    ctx: &Rc<Ctx>,
    conn: ConnId,
    stream: &mut TcpStream,
    wire: &mut Wire,
    buffer: &mut [u8],
    cx: &mut Context<'_>,
    wait: Wait,
) -> Poll<Event> {
    let mut core = ctx.core.borrow_mut();
    if core.must_abort(conn) {
        return Poll::Ready(Event::Closed);
    }
    ctx.wakers.borrow_mut().insert(conn, cx.waker().clone());
    // With layers, frames go down through them first; what TLS accepts leaves the
    // core's output, so the core's output bound still applies to what is not encrypted,
    // and a layer takes more only while it holds less than LAYERED_BYTES_MAX.
    if wire.is_layered() && wire.held_bytes() < LAYERED_BYTES_MAX {
        match wire.prepare_output(core.output(conn)) {
            Ok(0) => {}
            Ok(taken) => core.consume_output(conn, taken, now()),
            Err(_) => return Poll::Ready(Event::Closed),
        }
    }
    // A connection closing before its layers' handshake is done (refused at the
    // connection limit, say) first completes it, so that the client reads the typed
    // error instead of a reset; the core's deadline bounds how long that may take.
    let closing = core.is_closing(conn) && !wire.is_handshaking();
    let paused = core.reading_paused(conn);
    let pending_output: &[u8] = if wire.is_layered() { &wire.out } else { core.output(conn) };
    if !pending_output.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, pending_output) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Closed),
            Poll::Ready(Ok(n)) => return Poll::Ready(Event::Wrote(n)),
            Poll::Pending => {}
        }
    } else if closing && (!wire.is_layered() || core.output(conn).is_empty()) {
        return Poll::Ready(Event::Closed);
    }
    let held = match wait {
        Wait::Flush => return Poll::Pending,
        Wait::Anything { held } => held,
    };
    if closing || paused {
        // Flushing before close, or the core is behind: read nothing now.
        return Poll::Pending;
    }
    if held {
        return Poll::Ready(Event::Resume);
    }
    drop(core);
    match Pin::new(&mut *stream).poll_read(cx, buffer) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Closed),
        Poll::Ready(Ok(n)) => Poll::Ready(Event::Read(n)),
        Poll::Pending => Poll::Pending,
    }
}
