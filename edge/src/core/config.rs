//! The core's tunables: what tests and operators change (`ternd` flags fill it).

use crate::limits::Rate;

/// Tunables of the core that tests and operators change.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Largest frame the server accepts after the handshake.
    pub max_frame_bytes: u32,
    /// Verification codes stop working after this.
    pub code_ttl_ms: u64,
    /// A connection must authenticate (or register) this soon after it starts.
    pub auth_deadline_ms: u64,
    /// An authenticated connection that sends no whole frame for this long is closed.
    pub idle_timeout_ms: u64,
    /// Code requests per phone number per hour.
    pub code_requests_per_hour: u32,
    /// Wrong codes accepted per issued code before it is burnt.
    pub code_attempts_max: u32,
    /// Default time-to-live of undelivered envelopes.
    pub default_ttl_ms: u64,
    /// Heartbeat interval advertised in `Welcome`.
    pub heartbeat_interval_ms: u32,
    /// Sends per device: a burst, then a steady rate (typed `RateLimited` beyond it).
    pub send_rate: Rate,
    /// 1:1 sends per device to users who never wrote to its account (typed
    /// `StrangerRate` beyond it): a person starts a few conversations a minute; a
    /// spammer, or a fleet of accounts flooding one victim, many a second.
    pub stranger_send_rate: Rate,
    /// Key-bundle fetches per (requester, target) pair: a client needs a handful per
    /// contact; draining someone's one-time keys needs many.
    pub fetch_rate: Rate,
    /// Fetches of one user's bundles that take one-time keys, per hour and core, from
    /// all requesters together (beyond: the fallback key, and a session starts all the
    /// same, with a little less forward secrecy for its first message). A user rarely
    /// hears from more than a few new devices an hour; a fleet of accounts draining keys
    /// is held here.
    pub one_time_key_fetches_per_hour: u32,
    /// Envelopes queued per device at most (the oldest are dropped, with notices).
    pub mailbox_max_messages: u64,
    /// Bytes queued per device at most (likewise).
    pub mailbox_max_bytes: u64,
    /// The share of a device's mailbox (percent of both limits) one sender may fill: past
    /// it, its messages are refused (`QuotaExceeded`) and its receipts dropped, so that one
    /// sender cannot push everyone else's messages out of somebody's mailbox.
    pub mailbox_sender_share_percent: u64,
    /// Whether this server takes media (the runtime or the simulation runs the blob
    /// store behind it).
    pub media_enabled: bool,
    /// Largest media blob accepted.
    pub media_max_bytes: u64,
    /// Committed media blobs are deleted after this.
    pub media_ttl_ms: u64,
    /// Phone hashes one account may look up per day (contact discovery).
    pub discovery_per_day: u32,
    /// Codes sent per number prefix (the first 6 characters, like `+15551`) per hour, per
    /// core: SMS pumping targets ranges of premium numbers.
    pub code_requests_per_prefix_per_hour: u32,
    /// Codes sent per client network address (an IPv4 address, an IPv6 /64) per hour,
    /// per core.
    pub code_requests_per_address_per_hour: u32,
    /// Whether loopback clients count against the per-address budgets (codes,
    /// unauthenticated connections; by default a local process, such as a load
    /// generator or a TLS terminator, is exempt).
    pub code_budget_loopback: bool,
    /// Connections from one network address that have not authenticated yet, at most,
    /// per core (0: no limit; see `core::addresses`).
    pub pre_auth_per_address: u32,
    /// How long a connection's output may sit over its bound with nothing read before it
    /// is closed with `NotReading`.
    pub stall_timeout_ms: u64,
    /// Requests an authenticated connection may make (a burst, then a steady rate);
    /// past it the connection is not read until it may make one again.
    pub request_rate: Rate,
    /// Devices asking to be linked per client address per hour, per core.
    pub link_requests_per_address_per_hour: u32,
    /// Leading zero bits a proof of work must have before a code is sent (0: none asked).
    pub code_pow_bits: u8,
    /// Accept push endpoints over plain http or at private, loopback and link-local
    /// addresses (development and tests; see `wakeups::check_push_url`).
    pub push_insecure_endpoints: bool,
    /// When not empty, the only UnifiedPush hosts called: a host name, or `.domain` for
    /// any host under it (`--push-allowed-hosts`).
    pub push_allowed_hosts: Vec<String>,
    /// Free bytes kept for messages on the data directory's file system: below it new
    /// accounts, uploads and exports are refused (`StorageRefusal::Reserve`) while
    /// message appends go on. 0: no reserve.
    pub disk_reserve_bytes: u64,
    /// Media bytes one account may hold: committed blobs, exports and the declared
    /// size of its uploads in progress.
    pub media_account_max_bytes: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_frame_bytes: tern_wire::DEFAULT_MAX_FRAME_BYTES,
            code_ttl_ms: 10 * 60 * 1000,
            auth_deadline_ms: 10_000,
            idle_timeout_ms: 90_000,
            code_requests_per_hour: 5,
            code_attempts_max: 5,
            default_ttl_ms: 30 * 24 * 3600 * 1000,
            heartbeat_interval_ms: 30_000,
            send_rate: Rate { burst: 200.0, per_second: 50.0 },
            stranger_send_rate: Rate { burst: 60.0, per_second: 5.0 },
            fetch_rate: Rate { burst: 10.0, per_second: 10.0 / 3600.0 },
            one_time_key_fetches_per_hour: 30,
            mailbox_max_messages: 10_000,
            mailbox_max_bytes: 256 << 20,
            mailbox_sender_share_percent: 50,
            media_enabled: true,
            media_max_bytes: 100 << 20,
            media_ttl_ms: 30 * 24 * 3600 * 1000,
            discovery_per_day: 5_000,
            code_requests_per_prefix_per_hour: 1_000,
            code_requests_per_address_per_hour: 20,
            code_budget_loopback: false,
            pre_auth_per_address: 64,
            link_requests_per_address_per_hour: 20,
            stall_timeout_ms: crate::core::conns::STALL_TIMEOUT_MS,
            request_rate: crate::core::conns::REQUEST_RATE,
            code_pow_bits: 0,
            push_insecure_endpoints: false,
            push_allowed_hosts: Vec::new(),
            disk_reserve_bytes: 0,
            media_account_max_bytes: 4 << 30,
        }
    }
}
