//! Tern's protocol for load generators: frames, a handshake, registration, and
//! authentication over tokio TCP streams, with the server's log as the code source.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_wire::messages::*;
use tern_wire::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// One frame's bytes.
pub fn frame<T>(request_id: u32, value: &T) -> Vec<u8>
where
    T: Payload + for<'a, 'b> rkyv::Serialize<WireSerializer<'a, 'b>>,
{
    let mut out = Vec::new();
    encode_frame(&mut out, request_id, 0, value, DEFAULT_MAX_FRAME_BYTES).expect("frame fits");
    out
}

/// Reads frames until one satisfies `want`; returns (type, payload).
pub async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    decoder: &mut FrameDecoder,
    mut want: impl FnMut(&Frame<'_>) -> bool,
) -> (MessageType, Vec<u8>) {
    let mut buffer = vec![0u8; 16384];
    loop {
        while let Some(frame) = decoder.next_frame().expect("server frames decode") {
            if want(&frame) {
                return (frame.header.message_type, frame.payload.to_vec());
            }
        }
        let n = stream.read(&mut buffer).await.expect("read");
        assert!(n > 0, "server closed the connection");
        decoder.feed(&buffer[..n]);
    }
}

/// Device keys whose fallback key is signed by a fresh signing key, as ternd checks;
/// returns them with the signing key (PKCS#8) for group changes.
pub fn signed_keys() -> (DeviceKeys, Vec<u8>) {
    signed_keys_with(0)
}

/// Device keys as [`signed_keys`], with `one_time_keys` signed one-time prekeys (at most
/// 100: ternd's limit per frame), for runs that fetch key bundles.
pub fn signed_keys_with(one_time_keys: usize) -> (DeviceKeys, Vec<u8>) {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("random");
    let signer = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let (key_id, public_key) = (1u64, [3u8; 32]);
    let signed = SignedPrekey::signed_bytes(key_id, &public_key);
    let signature = signer.sign(&signed).as_ref().try_into().expect("64 bytes");
    let one_time_keys = (0..one_time_keys as u64)
        .map(|i| {
            let (key_id, public_key) = (100 + i, [(i % 251) as u8 + 4; 32]);
            let signed = SignedPrekey::signed_bytes(key_id, &public_key);
            let signature = signer.sign(&signed).as_ref().try_into().expect("64 bytes");
            SignedPrekey { key_id, public_key, signature }
        })
        .collect();
    let keys = DeviceKeys {
        identity_key: [1; 32],
        signing_key: signer.public_key().as_ref().try_into().expect("32 bytes"),
        fallback_key: SignedPrekey { key_id, public_key, signature },
        one_time_keys,
    };
    (keys, pkcs8.as_ref().to_vec())
}

/// Sends `Hello` and waits for `Welcome` on any byte stream (TCP or TLS).
pub async fn hello<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> FrameDecoder {
    match try_hello(stream).await {
        Ok(decoder) => decoder,
        Err(code) => panic!("the server refused the connection: {code:?}"),
    }
}

/// Sends `Hello` and waits for `Welcome`; a connection the server refuses (an error frame
/// before the welcome, e.g. `TooManyConnections` at its connection limit) is the error's
/// code (`None`: closed without one).
pub async fn try_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<FrameDecoder, Option<ErrorCode>> {
    let mut decoder = FrameDecoder::new(ABSOLUTE_MAX_FRAME_BYTES);
    let hello = Hello {
        magic: HELLO_MAGIC,
        version_min: 1,
        version_max: 1,
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        client: "tern-bench".into(),
    };
    stream.write_all(&frame(1, &hello)).await.map_err(|_| None)?;
    let mut buffer = vec![0u8; 4096];
    loop {
        while let Some(frame) = decoder.next_frame().map_err(|_| None)? {
            if let Message::ErrorFrame(error) = &frame.message {
                return Err(ErrorCode::from_u16(error.code.to_native()));
            }
            if frame.header.request_id == 1 {
                return Ok(decoder);
            }
        }
        match stream.read(&mut buffer).await {
            Ok(n) if n > 0 => decoder.feed(&buffer[..n]),
            _ => return Err(None),
        }
    }
}

/// Connects over TCP and says hello.
pub async fn handshake(addr: SocketAddr) -> (TcpStream, FrameDecoder) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let decoder = hello(&mut stream).await;
    (stream, decoder)
}

/// Verification codes by phone number, filled from the server's log.
pub type Codes = Arc<Mutex<HashMap<String, String>>>;

/// A registered device: (user id, token), with its signing key (PKCS#8).
pub struct Registered {
    /// The account.
    pub user_id: u64,
    /// Its primary device's bearer token.
    pub token: Token,
    /// The device's Ed25519 signing key (PKCS#8).
    pub signer: Vec<u8>,
}

/// Registers `phone` through the protocol, taking the code from `codes`.
pub async fn register(addr: SocketAddr, phone: &str, codes: &Codes) -> Registered {
    register_with_keys(addr, phone, codes, 0).await
}

/// Registers `phone` as [`register`] does, its device bringing `one_time_keys` one-time
/// prekeys.
pub async fn register_with_keys(
    addr: SocketAddr,
    phone: &str,
    codes: &Codes,
    one_time_keys: usize,
) -> Registered {
    let (mut stream, mut decoder) = handshake(addr).await;
    let request = RequestCode {
        phone: phone.into(),
        channel: CodeChannel::Sms,
        locale: "en".into(),
        proof_of_work: None,
    };
    stream.write_all(&frame(2, &request)).await.unwrap();
    let (ty, _) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 2).await;
    assert_eq!(ty, MessageType::CodeSent, "no code for {phone} (a code budget?)");
    let code = loop {
        if let Some(code) = codes.lock().unwrap().get(phone).cloned() {
            break code;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let (keys, signer) = signed_keys_with(one_time_keys);
    let verify = Verify {
        phone: phone.into(),
        code,
        device: NewDevice { name: "load".into(), keys },
        registration_lock_pin: None,
    };
    stream.write_all(&frame(3, &verify)).await.unwrap();
    let (ty, payload) = read_until(&mut stream, &mut decoder, |f| f.header.request_id == 3).await;
    assert_eq!(ty, MessageType::Registered);
    let registered = access::<tern_wire::messages::Registered>(&payload).unwrap();
    Registered { user_id: registered.user_id.to_native(), token: registered.token, signer }
}

/// Authenticates device 1 of `user_id` on a stream that said hello.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    decoder: &mut FrameDecoder,
    user_id: u64,
    token: Token,
) {
    let auth = Auth { user_id, device_id: 1, token };
    stream.write_all(&frame(2, &auth)).await.unwrap();
    let (ty, _) = read_until(stream, decoder, |f| f.header.request_id == 2).await;
    assert_eq!(ty, MessageType::AuthOk, "authentication refused");
}
