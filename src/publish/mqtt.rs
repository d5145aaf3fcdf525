//! The MQTT publisher: a consumer of the frame log with its own cursor.
//!
//! This is the only module that touches the MQTT client crate (rumqttc).
//!
//! # Two connections at QoS 1
//!
//! rumqttc writes every publish with a system call of its own. At QoS 1 the data
//! path (records, merged groups, alarms, re-drives) therefore goes over a second
//! connection, [`wire`], client id `{client_id}-data`, that writes every publish
//! ready at once in one buffer; rumqttc keeps the retained gateway status with
//! its last will, device presence and checkpoints. The two are one unit: either
//! failing drops both, and the next connection of both starts at the cursors.
//! QoS 0 and 2 use rumqttc for everything.
//!
//! # Why it does not trust the client's queue
//!
//! rumqttc keeps un-acknowledged QoS 1 publishes in memory and clears them when
//! it reconnects to a broker that did not resume the session, and its
//! `publish().await` blocks once its request channel is full (rumqtt issues
//! #910 and #1025, and the `pending.clear()` on `session_present == false` in
//! its event loop). So the client is used as a socket with flow control only:
//!
//! - The publisher drives the event loop itself, in one task, and hands the
//!   client at most `max_inflight` publishes at a time with the non-blocking
//!   `try_publish` (the request channel is larger than that, so it never fills).
//! - Each publish is matched to its log seq through the order of the client's
//!   `Outgoing::Publish(pkid)` events (the client sends requests in order), then
//!   to its PUBACK (QoS 1) or PUBCOMP (QoS 2) by packet id. The data connection
//!   assigns packet ids itself and keeps the tag with each.
//! - The cursor `mqtt` advances only to the highest seq whose own
//!   acknowledgement and all earlier ones have arrived; records that are not
//!   published count as done at once.
//! - Any connection error drops the client and its event loop entirely; the
//!   next connection is a fresh client (clean session) that starts again at the
//!   cursor. Duplicates are bounded by what was in flight; a record or alarm
//!   sent again on a later data connection carries the DUP flag.
//! - Ingest never waits: sessions only append to the log; presence changes go
//!   through [`Presence`], which never blocks.
//!
//! Alarms (see `crate::alarm`) are published on `{prefix}/{mn}/alarm` from a third
//! cursor, `mqtt.alarms`, over the `alarm_events` table: same client, same QoS, the
//! cursor advances to the highest event id below which everything is acknowledged.
//! It counts event ids, not seqs, so it is kept in `event_cursors`; the follower
//! writes it with the other two, in one transaction.
//!
//! Split-upload groups are rebuilt on start from the second cursor
//! `mqtt.merge` (the lowest seq of any group still open or whose merged message
//! is not yet acknowledged), so a restart loses no group.
//!
//! MQTT 3.1.1 gives the client no way to learn the broker's packet limit, so it
//! is configured (`max_packet_size`): the client sends nothing larger and the
//! merger keeps every merged message, topic included, under it.
//!
//! # No message can stop the publisher
//!
//! A message the broker will not take would otherwise be sent again after every
//! reconnect, for ever, and nothing behind it would go out. So (see
//! `crate::store` dead letters):
//!
//! - What can be checked here is checked before the client sees it: the topic
//!   ([`plan::topic_problem`]) and the packet size against `mqtt.max_packet_size`.
//!   A record that fails is set aside at once (reason `invalid_topic` or `oversize`).
//! - A broker refuses a publish under MQTT 3.1.1 by closing the connection. When a
//!   connection is lost with several publishes outstanding, the next connection
//!   sends those one at a time; a loss with a single message outstanding counts
//!   against that message, and after `mqtt.max_refusals` such losses it is set
//!   aside (reason `broker_refused`, the client's error as detail).
//! - Set-aside records are written with the cursor in one transaction, and the
//!   cursor moves on. Merged groups are set aside as `mqtt.merge` (seq = first
//!   packet), alarm events as `mqtt.alarms` (seq = event id).
//! - Crash-loop guard: the publisher counts its starts in its cursor row; after
//!   `[store] crash_loop_starts` starts at the same place without a clean stop it
//!   reads one record at a time and marks each before planning and merging it, so
//!   a record that aborts the process is set aside (reason `crash`) on the next
//!   start.
//! - Entries an operator marks for re-drive are published once more (outside the
//!   cursor) and resolved on their acknowledgement.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, Request, TlsConfiguration, Transport,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

mod wire;

#[doc(hidden)]
pub use wire::encode_publish;

use wire::{Target, Wire};

use super::merge::{self, Limit, Merged, Merger, Part};
use super::plan::{self, Decision, PlanOptions, Refusal};
use super::presence::{DeviceStatus, Presence};
use crate::config::{ConfigError, MqttSection, parse_broker_url};
use crate::store::follower::{self, Consumer, Follower, Plan, Rewind, Start};
use crate::store::merkle::LogTree;
use crate::store::{AlarmStore, DeadLetter, DeadLetterRow, Feed, StoreError};

/// Cursor of published (and acknowledged) records.
pub const CURSOR: &str = "mqtt";
/// Cursor below which no split-upload group is open or unacknowledged.
pub const MERGE_CURSOR: &str = "mqtt.merge";
/// Cursor of published (and acknowledged) alarm events (`alarm_events.id`).
pub const ALARM_CURSOR: &str = "mqtt.alarms";
/// Alarm events handed to the client at once.
const ALARM_BATCH: usize = 256;

/// Payload of the retained gateway status while connected.
pub const ONLINE: &str = "online";
/// Payload of the last will (and of a clean stop).
pub const OFFLINE: &str = "offline";

/// How often the publisher looks for new records once caught up.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How often the cursors are written (each write is a commit on the log's file).
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// First reconnect delay; doubles up to `reconnect_max`.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// On stop, how long in-flight publishes get to be acknowledged.
const STOP_DRAIN: Duration = Duration::from_secs(2);
/// Bytes of a PUBLISH besides its payload and topic: fixed header (at most 5),
/// topic length (2) and packet id (2), rounded up.
const PUBLISH_OVERHEAD: usize = 16;
/// Largest packet we accept from the broker (we subscribe to nothing).
const MAX_PACKET: usize = 8 << 20;
/// Consumer name of merged split-upload groups in the dead letters.
pub const MERGE_DEAD: &str = "mqtt.merge";
/// How often (ticks of IDLE_POLL) the publisher looks for entries to re-drive.
const REDRIVE_EVERY: u32 = 20; // 1 s
/// Entries re-driven per look.
const REDRIVE_BATCH: usize = 64;
/// Refusal counters kept at once (one per message alone in flight at a loss).
const REFUSALS_MAX: usize = 4096;

/// Everything the publisher needs, resolved from `[mqtt]` (files read, URL parsed).
#[derive(Clone)]
pub struct MqttSettings {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT client id (also a topic level of the gateway status).
    pub client_id: String,
    username: Option<String>,
    password: Option<String>,
    keep_alive: Duration,
    qos: QoS,
    max_inflight: usize,
    batch: usize,
    merge_wait: Duration,
    merge_max_groups: usize,
    merge_max_packets: u64,
    merge_max_bytes: usize,
    reconnect_max: Duration,
    max_packet: usize,
    max_refusals: u32,
    /// `[store] crash_loop_starts` (the daemon sets it; default 2).
    pub crash_loop_starts: u32,
    /// Selection and payload options.
    pub plan: PlanOptions,
}

impl std::fmt::Debug for MqttSettings {
    // Hand-written so the password can never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("qos", &self.qos)
            .field("max_inflight", &self.max_inflight)
            .finish_non_exhaustive()
    }
}

impl MqttSettings {
    /// Resolves `[mqtt]`: reads `password_file` (trailing newline trimmed) and the TLS
    /// files. `path` names the config file in errors; errors name the key.
    pub fn from_config(m: &MqttSection, path: &Path) -> Result<MqttSettings, ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("mqtt.{key}"),
            message,
        };
        let url = parse_broker_url(&m.url).map_err(|e| bad("url", e))?;
        let password = match (&m.password, &m.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| bad("password_file", format!("{}: {e}", f.display())))?;
                Some(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            (None, None) => None,
        };
        let tls = if url.tls {
            Some(Arc::new(tls_config(m, &bad)?))
        } else {
            None
        };
        Ok(MqttSettings {
            host: url.host,
            port: url.port,
            tls,
            client_id: m.client_id.clone().unwrap_or_else(default_client_id),
            username: m.username.clone(),
            password,
            keep_alive: m.keep_alive.0,
            qos: match m.qos {
                0 => QoS::AtMostOnce,
                2 => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            },
            max_inflight: m.max_inflight,
            batch: m.batch,
            merge_wait: m.merge_wait.0,
            merge_max_groups: m.merge_max_groups,
            merge_max_packets: m.merge_max_packets,
            merge_max_bytes: m.merge_max_bytes,
            reconnect_max: m.reconnect_max.0,
            max_packet: m.max_packet_size,
            max_refusals: m.max_refusals,
            crash_loop_starts: 2,
            plan: PlanOptions {
                prefix: m.topic_prefix.clone(),
                publish_rejected: m.publish_rejected,
                include_raw: m.include_raw,
            },
        })
    }

    /// The split-upload merger's caps: a merged message, its topic included,
    /// stays within `max_packet_size`.
    fn merge_limits(&self) -> merge::Limits {
        // `{prefix}/{mn}/{cn}/merged`: the merger accounts MN and CN itself.
        let fixed = self.plan.prefix.len() + "///merged".len() + PUBLISH_OVERHEAD;
        merge::Limits {
            wait: self.merge_wait,
            max_groups: self.merge_max_groups,
            max_packets: self.merge_max_packets,
            max_bytes: self.merge_max_bytes,
            max_message: self.max_packet.saturating_sub(fixed),
        }
    }

    fn gateway_topic(&self) -> String {
        plan::gateway_topic(&self.plan.prefix, &self.client_id)
    }

    fn checkpoint_topic(&self) -> String {
        plan::checkpoint_topic(&self.plan.prefix, &self.client_id)
    }

    /// Whether the data path has its own connection ([`wire`]): QoS 1 only; QoS 0
    /// and 2 publish everything through rumqttc.
    fn uses_wire(&self) -> bool {
        self.qos == QoS::AtLeastOnce
    }

    /// The data connection: same broker, TLS and credentials, its own client id
    /// (`{client_id}-data`), no will (the will stays with the status on rumqttc).
    fn wire_target(&self) -> Target {
        Target {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls.clone(),
            client_id: format!("{}-data", self.client_id),
            login: self
                .username
                .as_ref()
                .map(|u| (u.clone(), self.password.clone().unwrap_or_default())),
            keep_alive: self.keep_alive,
        }
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive)
            // A clean session on purpose: the log, not the broker, holds what is unsent.
            .set_clean_session(true)
            .set_inflight(u16::try_from(self.max_inflight).unwrap_or(u16::MAX))
            .set_request_channel_capacity(self.max_inflight + 16)
            // Outgoing: what `plan::check_message` lets through, plus slack for
            // the client's own accounting; the check is the binding limit.
            .set_max_packet_size(MAX_PACKET, self.max_packet.saturating_add(64))
            .set_last_will(LastWill::new(self.gateway_topic(), OFFLINE, self.qos, true));
        if let Some(u) = &self.username {
            o.set_credentials(u.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }
}

fn tls_config(
    m: &MqttSection,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &m.ca_file {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(bad("ca_file", format!("{}: no certificate", ca.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(bad(
                    "ca_file",
                    "no system CA certificates found; set ca_file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("url", format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&m.client_cert, &m.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad("client_cert", format!("{}: {e}", cert.display())))?;
            let k = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| bad("client_key", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| bad("client_key", format!("{e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `hj212-gateway-<hostname>`, limited to characters that are safe in a topic level.
fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if host.is_empty() {
        "hj212-gateway".into()
    } else {
        format!("hj212-gateway-{host}")
    }
}

/// Starts the publisher on the log at `db`; it runs until `shutdown` is cancelled,
/// then publishes the gateway's `offline`, lets in-flight publishes be acknowledged
/// (briefly), persists its cursors and returns.
pub fn spawn(
    settings: MqttSettings,
    db: PathBuf,
    feed: Arc<Feed>,
    presence: Arc<Presence>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let mqtt = Mqtt { settings, presence };
    // A thread of its own: on the async threads its pump queued behind two
    // thousand sessions at every turn, and at saturation it fell seconds
    // behind the log while the sessions kept up (benches/README.md, issue 23).
    match follower::spawn_thread(
        "hj212-mqtt",
        || {},
        mqtt.clone(),
        db.clone(),
        feed.clone(),
        shutdown.clone(),
    ) {
        Ok(task) => task,
        Err(e) => {
            warn!(error = %e, "MQTT publisher thread cannot start; it runs on the async threads");
            follower::spawn(mqtt, db, feed, shutdown)
        }
    }
}

/// The publisher as a consumer of the log (see [`crate::store::follower`]).
#[derive(Clone)]
struct Mqtt {
    settings: MqttSettings,
    presence: Arc<Presence>,
}

impl Consumer for Mqtt {
    type Task = Publisher;

    fn plan(&self) -> Plan {
        Plan {
            name: CURSOR.into(),
            what: "MQTT publisher",
            start: Start::Oldest,
            keep_start: false,
            // Split-upload groups are rebuilt from the merge cursor.
            rewind: Rewind::Cursor(MERGE_CURSOR),
            poll: IDLE_POLL,
            save_every: PERSIST_EVERY,
            crash_loop_starts: self.settings.crash_loop_starts,
        }
    }

    fn open(self, f: Follower) -> Result<Publisher, StoreError> {
        Publisher::open(self.settings, f, self.presence)
    }

    async fn run(p: Publisher, shutdown: CancellationToken) -> Follower {
        p.run(shutdown).await
    }
}

/// What a publish is for, so its acknowledgement can be accounted.
#[derive(Debug, Clone)]
enum Tag {
    Data(u64),
    Merged(u64),
    Presence(String, DeviceStatus),
    Alarm(u64),
    Status,
    /// The retained signed checkpoint of this tree size.
    Checkpoint(u64),
    /// A dead letter re-driven: (entry id, consumer, seq).
    Redrive(i64, &'static str, u64),
}

/// A message's identity across reconnects, for counting refusals.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Data(u64),
    Merged(u64),
    Alarm(u64),
    Redrive(i64),
    Presence(String),
    Status,
    Checkpoint,
}

impl Tag {
    fn key(&self) -> Key {
        match self {
            Tag::Data(s) => Key::Data(*s),
            Tag::Merged(id) => Key::Merged(*id),
            Tag::Alarm(id) => Key::Alarm(*id),
            Tag::Redrive(id, ..) => Key::Redrive(*id),
            Tag::Presence(mn, _) => Key::Presence(mn.clone()),
            Tag::Status => Key::Status,
            Tag::Checkpoint(_) => Key::Checkpoint,
        }
    }
}

#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    tag: Tag,
}

/// One record after planning (done on a blocking thread).
struct ReadItem {
    seq: u64,
    msg: Option<(String, Vec<u8>)>,
    part: Option<Part>,
    refused: Option<Refusal>,
}

/// A read's start, and its items with the last seq it covered.
type ReadTask = JoinHandle<(u64, Result<(Vec<ReadItem>, u64), StoreError>)>;

enum Ended {
    Shutdown,
    Lost(String),
}

struct Publisher {
    s: MqttSettings,
    /// The log behind the cursors `mqtt`, `mqtt.merge` and `mqtt.alarms`.
    f: Follower,
    presence: Arc<Presence>,
    /// Records at or below were published before this start: they only rebuild groups.
    floor: u64,
    /// Data frontier: every record up to here is acknowledged or not published.
    acked: u64,
    /// `(seq, done)` after `acked` up to `next_read`, in seq order: every inbound
    /// frame read, and the last seq of a stretch that holds nothing to publish.
    window: VecDeque<(u64, bool)>,
    next_read: u64,
    read_task: Option<ReadTask>,
    caught_up: bool,
    merger: Merger,
    merge_fed: u64,
    merged_unacked: BTreeMap<u64, (u64, Msg)>,
    next_merged_id: u64,
    presence_unacked: HashMap<String, DeviceStatus>,
    alarms: Arc<Mutex<AlarmStore>>,
    /// Every alarm event up to here is acknowledged.
    alarm_acked: u64,
    /// Highest alarm event queued on this connection.
    alarm_next: u64,
    alarm_unacked: BTreeSet<u64>,
    /// Where the notary keeps signed checkpoints (`None` until it opens).
    checkpoints: Arc<Mutex<Option<LogTree>>>,
    /// Size of the checkpoint the broker acknowledged on this connection.
    checkpoint_acked: u64,
    /// Size of the checkpoint queued and not yet acknowledged.
    checkpoint_queued: Option<u64>,
    /// For rumqttc: status, presence and checkpoints (and, without the data
    /// connection, merged groups, alarms and re-drives too).
    ctrl: VecDeque<Msg>,
    /// For the data connection, ahead of `data`: merged groups, alarms, re-drives.
    side: VecDeque<Msg>,
    data: VecDeque<Msg>,
    /// Highest data seq and alarm event id handed to a connection: sent again on
    /// a later one, they carry the DUP flag.
    data_sent_high: u64,
    alarm_sent_high: u64,
    /// Connection losses with one message alone in flight, per message.
    refusals: HashMap<Key, u32>,
    /// Messages outstanding at a loss with several outstanding: while any is
    /// unresolved, publishes go one at a time so the next loss names one.
    suspects: std::collections::HashSet<Key>,
    /// Re-driven entries queued on this connection.
    redriving: std::collections::HashSet<i64>,
    /// Set-aside messages since the last warning line (a flood logs one line a minute).
    dead_quiet: (u64, Option<tokio::time::Instant>),
    // Per connection:
    sent_fifo: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    in_client: usize,
}

impl Publisher {
    /// The publisher's state around its follower (blocking): the data cursor, the
    /// merge cursor (where the follower re-reads from) and the alarm-event cursor.
    fn open(
        s: MqttSettings,
        f: Follower,
        presence: Arc<Presence>,
    ) -> Result<Publisher, StoreError> {
        let (data, merge) = (f.cursor_at_start(), f.rewind_from());
        let alarms = AlarmStore::open(f.db())?;
        let alarm = alarms.event_cursor(ALARM_CURSOR)?.unwrap_or(0);
        info!(
            cursor = data,
            merge_cursor = merge,
            "MQTT publisher resumes from its cursor"
        );
        Ok(Publisher {
            merger: Merger::new(s.merge_limits()),
            s,
            f,
            presence,
            floor: data,
            acked: merge,
            window: VecDeque::new(),
            next_read: merge,
            read_task: None,
            caught_up: false,
            merge_fed: merge,
            merged_unacked: BTreeMap::new(),
            next_merged_id: 0,
            presence_unacked: HashMap::new(),
            alarms: Arc::new(Mutex::new(alarms)),
            alarm_acked: alarm,
            alarm_next: alarm,
            alarm_unacked: BTreeSet::new(),
            checkpoints: Arc::new(Mutex::new(None)),
            checkpoint_acked: 0,
            checkpoint_queued: None,
            ctrl: VecDeque::new(),
            side: VecDeque::new(),
            data: VecDeque::new(),
            data_sent_high: 0,
            alarm_sent_high: 0,
            refusals: HashMap::new(),
            suspects: std::collections::HashSet::new(),
            redriving: std::collections::HashSet::new(),
            dead_quiet: (0, None),
            sent_fifo: VecDeque::new(),
            inflight: HashMap::new(),
            in_client: 0,
        })
    }

    async fn run(mut self, shutdown: CancellationToken) -> Follower {
        let mut backoff = BACKOFF_MIN;
        let mut attempt: u32 = 0;
        // The broker can stay away for days while the retry timer fires every
        // few seconds: one line, then ever rarer ones with the count.
        let mut unreachable = crate::telemetry::Streak::new();
        loop {
            let (client, mut el) = AsyncClient::new(self.s.options(), self.s.max_inflight + 16);
            // The data connection first: it has no will, so giving it up when
            // rumqttc cannot connect publishes no `offline`.
            let connected = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.connect_both(&mut el) => r,
            };
            let mut wire = match connected {
                Ok(wire) => {
                    self.f.metrics().mqtt_connected.set(1);
                    let failed_attempts = unreachable.end();
                    info!(host = %self.s.host, port = self.s.port, client_id = %self.s.client_id, failed_attempts, "MQTT connected");
                    backoff = BACKOFF_MIN;
                    attempt = 0;
                    wire
                }
                Err(e) => {
                    attempt += 1;
                    // The error never contains the password.
                    if let Some(suppressed) = unreachable.admit() {
                        warn!(suppressed, host = %self.s.host, port = self.s.port, attempt, retry_in_ms = backoff.as_millis() as u64, error = %e, "MQTT broker unreachable; ingest continues, publishing resumes from the cursor");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.s.reconnect_max);
                    continue;
                }
            };
            self.rewind().await;
            let ended = self.session(&client, &mut el, &mut wire, &shutdown).await;
            self.f.metrics().mqtt_connected.set(0);
            match ended {
                Ended::Shutdown => break,
                Ended::Lost(e) => {
                    crate::log_repeated!(warn, error = %e, cursor = self.acked, "MQTT connection lost; will resume from the cursor");
                    let on_wire: Vec<Tag> = match wire {
                        Some(w) => {
                            debug!(writes = w.writes(), "MQTT data connection closed");
                            w.into_inflight().collect()
                        }
                        None => Vec::new(),
                    };
                    self.on_lost(&e, on_wire);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        if let Some(t) = self.read_task.take() {
            let _ = t.await;
        }
        self.positions();
        self.f
    }

    /// Connects the data connection (QoS 1 only), then rumqttc.
    async fn connect_both(&self, el: &mut EventLoop) -> Result<Option<Wire<Tag>>, String> {
        let wire = if self.s.uses_wire() {
            let w = Wire::connect(&self.s.wire_target())
                .await
                .map_err(|e| format!("data connection: {e}"))?;
            Some(w)
        } else {
            None
        };
        connect(el).await.map_err(|e| e.to_string())?;
        Ok(wire)
    }

    /// Queues a message that is not a data record: for rumqttc, or for the data
    /// connection when there is one and the message belongs to the data path.
    fn queue(&mut self, m: Msg) {
        let data_path = matches!(m.tag, Tag::Merged(_) | Tag::Alarm(_) | Tag::Redrive(..));
        if data_path && self.s.uses_wire() {
            self.side.push_back(m);
        } else {
            self.ctrl.push_back(m);
        }
    }

    /// A new connection starts from the cursor with a fresh client: whatever the
    /// previous one had in flight is sent again.
    async fn rewind(&mut self) {
        if let Some(t) = self.read_task.take() {
            let _ = t.await;
        }
        self.next_read = self.acked;
        self.window.clear();
        self.data.clear();
        self.ctrl.clear();
        self.side.clear();
        self.sent_fifo.clear();
        self.inflight.clear();
        self.in_client = 0;
        self.caught_up = false;
        self.redriving.clear();
        self.alarm_next = self.alarm_acked;
        self.alarm_unacked.clear();
        // A broker that lost its retained messages gets the latest again.
        self.checkpoint_acked = 0;
        self.checkpoint_queued = None;
        self.ctrl.push_back(Msg {
            topic: self.s.gateway_topic(),
            payload: ONLINE.into(),
            retain: true,
            tag: Tag::Status,
        });
        let merged: Vec<Msg> = self
            .merged_unacked
            .values()
            .map(|(_, m)| m.clone())
            .collect();
        for m in merged {
            self.queue(m);
        }
        self.presence
            .restore(std::mem::take(&mut self.presence_unacked));
    }

    async fn session(
        &mut self,
        client: &AsyncClient,
        el: &mut EventLoop,
        wire: &mut Option<Wire<Tag>>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let mut tick = tokio::time::interval(self.f.poll());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        let mut acked: Vec<Tag> = Vec::new();
        loop {
            if let Err(e) = self.pump(client, wire.as_mut()) {
                return Ended::Lost(e);
            }
            self.maybe_read();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.goodbye(client, el, wire.take()).await;
                    return Ended::Shutdown;
                }
                // Before the event loop: while a backlog drains the broker's
                // acknowledgements keep `el.poll()` ready, and a tick behind it
                // would never run: no cursor written, no alarms or re-drives read.
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if self.caught_up {
                        self.caught_up = false;
                        let due = self.merger.expire(chrono::Utc::now().timestamp_millis());
                        self.enqueue_merged(due);
                    }
                    self.read_alarms().await;
                    if ticks % REDRIVE_EVERY == 0 {
                        self.read_redrives().await;
                        self.read_checkpoint().await;
                    }
                    self.persist().await;
                }
                r = poll_wire(wire, &mut acked) => match r {
                    Ok(()) => {
                        for tag in acked.drain(..) {
                            self.complete(tag);
                        }
                    }
                    Err(e) => return Ended::Lost(format!("data connection: {e}")),
                },
                ev = el.poll() => match ev {
                    Ok(ev) => self.on_event(ev),
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                r = async { self.read_task.as_mut().expect("guarded").await }, if self.read_task.is_some() => {
                    self.read_task = None;
                    match r {
                        Ok((after, Ok((items, through)))) => self.on_read(after, items, through),
                        Ok((_, Err(e))) => {
                            crate::log_repeated!(error, error = %e, "MQTT publisher cannot read the frame log; retrying");
                            self.caught_up = true;
                        }
                        Err(e) => error!(error = %e, "MQTT read task failed"),
                    }
                }
                // A caught-up publisher reads again as soon as something commits
                // (the tick below is the fallback), while the feed still holds it.
                r = self.f.committed(), if self.caught_up => {
                    if r.is_ok() {
                        self.caught_up = false;
                    }
                }
                _ = self.presence.changed() => {
                    for (mn, st) in self.presence.take() {
                        if !plan::topic_level_ok(&mn) {
                            continue;
                        }
                        self.presence_unacked.insert(mn.clone(), st.clone());
                        self.queue(Msg {
                            topic: plan::presence_topic(&self.s.plan.prefix, &mn),
                            payload: st.payload(),
                            retain: true,
                            tag: Tag::Presence(mn, st),
                        });
                    }
                }
            }
        }
    }

    /// Hands the client as many messages as the inflight window allows (control
    /// messages first). `try_publish` never waits: the channel holds more than the window.
    /// The message moves into the client (no copy of the payload): nothing needs it
    /// afterwards, because a lost connection re-reads data from the log and re-queues
    /// merged groups and presence from their own records. A refused publish comes
    /// back inside the error and is queued again as it was; should the client ever
    /// hand back something else, the message is gone from memory and the caller
    /// reconnects, which re-reads everything unacknowledged from the log.
    ///
    /// With a data connection, rumqttc gets only `ctrl`; the rest goes to
    /// [`Publisher::pump_wire`].
    fn pump(&mut self, client: &AsyncClient, wire: Option<&mut Wire<Tag>>) -> Result<(), String> {
        let on_wire = wire.as_ref().map_or(0, |w| w.len());
        loop {
            // After a loss with several publishes outstanding: one at a time (over
            // both connections), so that a broker closing the connection over one
            // message names it.
            let (window, busy) = if self.suspects.is_empty() {
                (self.s.max_inflight, self.in_client)
            } else {
                (1, self.in_client + on_wire)
            };
            if busy >= window {
                break;
            }
            let next = match wire {
                Some(_) => self.ctrl.pop_front(),
                None => self.ctrl.pop_front().or_else(|| self.data.pop_front()),
            };
            let Some(m) = next else {
                break;
            };
            if let Err(r) = plan::check_message(&m.topic, m.payload.len(), self.s.max_packet) {
                self.give_up(m.tag, r);
                continue;
            }
            let Msg {
                topic,
                payload,
                retain,
                tag,
            } = m;
            match client.try_publish(topic, self.s.qos, retain, payload) {
                Ok(()) => {
                    self.sent_fifo.push_back(tag);
                    self.in_client += 1;
                }
                Err(e) => {
                    debug!(error = %e, "MQTT request channel refused a publish; retrying later");
                    let (ClientError::Request(Request::Publish(p))
                    | ClientError::TryRequest(Request::Publish(p))) = e
                    else {
                        return Err(format!("MQTT client lost a refused publish: {e}"));
                    };
                    let m = Msg {
                        topic: p.topic,
                        payload: p.payload.into(),
                        retain,
                        tag,
                    };
                    match m.tag {
                        Tag::Data(_) => self.data.push_front(m),
                        _ => self.ctrl.push_front(m),
                    }
                    break;
                }
            }
        }
        if let Some(w) = wire {
            self.pump_wire(w);
        }
        Ok(())
    }

    /// Hands the data connection merged groups, alarms and re-drives, then data
    /// records, up to the window; all of it leaves in the connection's next write.
    /// It refills on every batch of acknowledgements, not once a share of the
    /// window is free: holding writes back also holds back the TCP ACKs they
    /// carry, and a broker with Nagle's algorithm on (mosquitto's default) then
    /// holds its PUBACKs for the 40 ms delayed-ACK timer (a 1 M backlog drained
    /// at 22,000 frames/s that way, against 52,000 with rumqttc).
    fn pump_wire(&mut self, w: &mut Wire<Tag>) {
        let (window, busy) = if self.suspects.is_empty() {
            (self.s.max_inflight, w.len())
        } else {
            (1, w.len() + self.in_client)
        };
        let free = window.saturating_sub(busy);
        if free == 0 {
            return;
        }
        let metrics = self.f.metrics().clone();
        let mut room = free;
        while room > 0 {
            let Some(m) = self.side.pop_front().or_else(|| self.data.pop_front()) else {
                break;
            };
            if let Err(r) = plan::check_message(&m.topic, m.payload.len(), self.s.max_packet) {
                self.give_up(m.tag, r);
                continue;
            }
            let dup = match m.tag {
                Tag::Data(seq) => {
                    let again = seq <= self.data_sent_high;
                    self.data_sent_high = self.data_sent_high.max(seq);
                    again
                }
                Tag::Alarm(id) => {
                    let again = id <= self.alarm_sent_high;
                    self.alarm_sent_high = self.alarm_sent_high.max(id);
                    again
                }
                _ => false,
            };
            w.publish(&m.topic, &m.payload, m.retain, dup, m.tag);
            metrics.mqtt_publishes.inc();
            room -= 1;
        }
    }

    fn maybe_read(&mut self) {
        let limit = self.f.page(self.next_read, self.s.batch);
        if self.read_task.is_some()
            || self.caught_up
            || self.data.len() >= limit
            || self.window.len() >= self.s.max_inflight + 2 * limit
        {
            return;
        }
        let after = self.next_read;
        let reader = self.f.reader();
        let opts = self.s.plan.clone();
        let floor = self.floor;
        let max_packet = self.s.max_packet;
        let dead = self.f.dead_in(after, limit as u64);
        let marker = self.f.marker().clone();
        self.read_task = Some(tokio::task::spawn_blocking(move || {
            // Careful mode: the one seq this read covers is marked before it is
            // planned and (in `on_read`) merged; a crash there names it.
            if let Err(e) = marker.mark(after + 1) {
                return (after, Err(e));
            }
            let r = reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_inbound_frames(after, limit);
            let items = r.map(|(recs, through)| {
                let items = recs
                    .into_iter()
                    .map(|rec| {
                        if dead.binary_search(&rec.seq).is_ok() {
                            return ReadItem {
                                seq: rec.seq,
                                msg: None,
                                part: None,
                                refused: None,
                            };
                        }
                        let (planned, refused) = match plan::decide(&rec, &opts, max_packet) {
                            Decision::Publish(p) => (Some(p), None),
                            Decision::Refuse(r) => (None, Some(r)),
                            Decision::Skip => (None, None),
                        };
                        let part = planned
                            .as_ref()
                            .and_then(|p| p.object.as_ref())
                            .and_then(|o| Part::from_object(o, rec.seq, rec.received_at_ms));
                        ReadItem {
                            seq: rec.seq,
                            msg: planned
                                .filter(|_| rec.seq > floor)
                                .map(|p| (p.topic, p.payload)),
                            part,
                            refused: refused.filter(|_| rec.seq > floor),
                        }
                    })
                    .collect::<Vec<_>>();
                (items, through)
            });
            (after, items)
        }));
    }

    fn on_read(&mut self, after: u64, items: Vec<ReadItem>, through: u64) {
        if after != self.next_read {
            return; // read before a rewind
        }
        // Short of the page this read asked for (one record while careful):
        // the log is read to its end, wait for the next commit or tick.
        if through - after < self.f.page(after, self.s.batch) as u64 {
            self.caught_up = true;
        }
        for it in items {
            if it.seq > self.merge_fed {
                self.merge_fed = it.seq;
                if let Some(p) = it.part {
                    let out = self.merger.push(p);
                    self.enqueue_merged(out);
                }
            }
            if let Some(r) = it.refused {
                self.set_aside(CURSOR, it.seq, r);
            }
            match it.msg {
                Some((topic, payload)) => {
                    self.window.push_back((it.seq, false));
                    self.data.push_back(Msg {
                        topic,
                        payload,
                        retain: false,
                        tag: Tag::Data(it.seq),
                    });
                }
                None => self.window.push_back((it.seq, true)),
            }
            self.next_read = it.seq;
        }
        // The rest of the stretch held nothing to publish (our acks, junk): done.
        if through > self.next_read {
            self.window.push_back((through, true));
            self.next_read = through;
        }
        self.advance();
    }

    fn enqueue_merged(&mut self, groups: Vec<Merged>) {
        let m = self.f.metrics();
        for (l, n) in Limit::ALL.into_iter().zip(self.merger.take_limited()) {
            m.mqtt_merge_limited(l.as_str(), n);
        }
        m.mqtt_merge_bytes
            .set(i64::try_from(self.merger.held_bytes()).unwrap_or(i64::MAX));
        m.mqtt_merge_groups
            .set(i64::try_from(self.merger.len()).unwrap_or(i64::MAX));
        for g in groups {
            let topic = plan::merged_topic(&self.s.plan.prefix, &g.mn, &g.cn);
            // Checked before it is kept for re-sending: a group the broker cannot
            // take must not hold the merge cursor.
            if let Err(r) = plan::check_message(&topic, g.payload.len(), self.s.max_packet) {
                self.set_aside(MERGE_DEAD, g.min_seq, r);
                continue;
            }
            let id = self.next_merged_id;
            self.next_merged_id += 1;
            let m = Msg {
                topic,
                payload: g.payload,
                retain: false,
                tag: Tag::Merged(id),
            };
            self.merged_unacked.insert(id, (g.min_seq, m.clone()));
            self.queue(m);
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                self.f.metrics().mqtt_publishes.inc();
                let Some(tag) = self.sent_fifo.pop_front() else {
                    return;
                };
                if self.s.qos == QoS::AtMostOnce {
                    self.in_client = self.in_client.saturating_sub(1);
                    self.complete(tag);
                } else {
                    self.inflight.insert(pkid, tag);
                }
            }
            Event::Incoming(Packet::PubAck(a)) if self.s.qos == QoS::AtLeastOnce => {
                if let Some(tag) = self.inflight.remove(&a.pkid) {
                    self.in_client = self.in_client.saturating_sub(1);
                    self.complete(tag);
                }
            }
            Event::Incoming(Packet::PubComp(a)) if self.s.qos == QoS::ExactlyOnce => {
                if let Some(tag) = self.inflight.remove(&a.pkid) {
                    self.in_client = self.in_client.saturating_sub(1);
                    self.complete(tag);
                }
            }
            _ => {}
        }
    }

    /// Accounts an acknowledged publish (from either connection).
    fn complete(&mut self, tag: Tag) {
        self.f.metrics().mqtt_acks.inc();
        if !self.suspects.is_empty() || !self.refusals.is_empty() {
            let k = tag.key();
            self.suspects.remove(&k);
            self.refusals.remove(&k);
        }
        self.settle(tag);
    }

    /// Accounts a message that is finished: acknowledged, or given up.
    fn settle(&mut self, tag: Tag) {
        match tag {
            Tag::Redrive(id, ..) => {
                self.redriving.remove(&id);
                self.f.resolve(id);
            }
            Tag::Data(seq) => {
                // Sorted by seq but not dense: stretches with nothing to publish
                // are one entry.
                if let Ok(i) = self.window.binary_search_by_key(&seq, |e| e.0) {
                    self.window[i].1 = true;
                }
                self.advance();
            }
            Tag::Merged(id) => {
                self.merged_unacked.remove(&id);
            }
            Tag::Presence(mn, st) => {
                if self.presence_unacked.get(&mn) == Some(&st) {
                    self.presence_unacked.remove(&mn);
                }
            }
            Tag::Alarm(id) => {
                self.alarm_unacked.remove(&id);
                self.alarm_acked = match self.alarm_unacked.first() {
                    Some(lowest) => lowest - 1,
                    None => self.alarm_next,
                };
            }
            Tag::Status => {}
            Tag::Checkpoint(size) => {
                self.checkpoint_acked = self.checkpoint_acked.max(size);
                if self.checkpoint_queued == Some(size) {
                    self.checkpoint_queued = None;
                }
            }
        }
    }

    /// Queues the latest signed checkpoint, retained, when the notary has cut one
    /// the broker has not acknowledged (once a second: checkpoints are minutes apart).
    /// Read from the log, where the notary keeps them before anyone is told.
    async fn read_checkpoint(&mut self) {
        if self.checkpoint_queued.is_some() {
            return;
        }
        let (log, db) = (Arc::clone(&self.checkpoints), self.f.db().to_owned());
        let read = self
            .f
            .blocking(move || {
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                if log.is_none() {
                    *log = Some(LogTree::open(&db)?);
                }
                log.as_ref().expect("opened above").latest_checkpoint()
            })
            .await;
        match read {
            Ok(Some(cp)) if cp.size > self.checkpoint_acked => {
                self.checkpoint_queued = Some(cp.size);
                self.ctrl.push_back(Msg {
                    topic: self.s.checkpoint_topic(),
                    payload: cp.note.into_bytes(),
                    retain: true,
                    tag: Tag::Checkpoint(cp.size),
                });
            }
            Ok(_) => {}
            Err(e) => {
                crate::log_repeated!(warn, error = %e, "MQTT publisher cannot read the latest checkpoint; retrying");
            }
        }
    }

    /// Queues new alarm events (once per idle tick, a bounded batch). The query is a
    /// short indexed read; awaiting it delays the event loop by about a millisecond.
    async fn read_alarms(&mut self) {
        if !self.alarm_unacked.is_empty() {
            return;
        }
        let (store, after) = (self.alarms.clone(), self.alarm_next);
        let read = self
            .f
            .blocking(move || {
                store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .events_after(after, ALARM_BATCH)
            })
            .await;
        let events = match read {
            Ok(e) => e,
            Err(e) => {
                error!(error = %e, "MQTT publisher cannot read alarm events; retrying");
                return;
            }
        };
        for e in events {
            self.alarm_next = e.id;
            if !plan::topic_level_ok(&e.mn) {
                continue;
            }
            self.alarm_unacked.insert(e.id);
            self.queue(Msg {
                topic: format!("{}/{}/alarm", self.s.plan.prefix, e.mn),
                payload: e.payload.into_bytes(),
                retain: false,
                tag: Tag::Alarm(e.id),
            });
        }
        if self.alarm_unacked.is_empty() {
            self.alarm_acked = self.alarm_next;
        }
    }

    fn advance(&mut self) {
        while let Some(&(seq, true)) = self.window.front() {
            self.acked = seq;
            self.window.pop_front();
        }
    }

    /// `mqtt.merge`: every group with a packet above it is open or was merged,
    /// published and acknowledged.
    fn merge_cursor(&self) -> u64 {
        let open = self.merger.lowest_open_seq();
        let unacked = self.merged_unacked.values().map(|(s, _)| *s).min();
        let lowest = open.into_iter().chain(unacked).min();
        lowest.map_or(self.acked, |s| (s - 1).min(self.acked))
    }

    /// Hands the follower the cursors as they stand: `mqtt` (never below what was
    /// published before this start), `mqtt.merge` and `mqtt.alarms`.
    fn positions(&mut self) {
        self.f.advance(self.acked.max(self.floor));
        self.f.set_also(MERGE_CURSOR, self.merge_cursor());
        self.f.set_event_cursor(ALARM_CURSOR, self.alarm_acked);
    }

    /// Writes the cursors (with the dead letters and resolved re-drives queued
    /// since) on the follower's cadence, in the background.
    async fn persist(&mut self) {
        self.positions();
        self.f.persist(false).await;
    }

    /// A lost connection: a single message outstanding is charged with it; with
    /// several, the next connection sends them one at a time (see the module doc).
    /// `on_wire`: what the data connection had in flight.
    fn on_lost(&mut self, error: &str, on_wire: Vec<Tag>) {
        let mut out: Vec<Tag> = self
            .sent_fifo
            .iter()
            .chain(self.inflight.values())
            .cloned()
            .chain(on_wire)
            .collect();
        match out.len() {
            0 => {}
            1 => {
                let tag = out.pop().expect("one");
                let k = tag.key();
                if self.refusals.len() >= REFUSALS_MAX {
                    self.refusals.clear();
                }
                let n = self.refusals.entry(k.clone()).or_insert(0);
                *n += 1;
                let n = *n;
                if n >= self.s.max_refusals {
                    self.refusals.remove(&k);
                    self.suspects.remove(&k);
                    self.give_up(
                        tag,
                        Refusal {
                            reason: "broker_refused",
                            detail: format!(
                                "connection lost {n} times with this message alone in flight: {error}"
                            ),
                        },
                    );
                } else {
                    debug!(
                        losses = n,
                        "MQTT connection lost with one message in flight"
                    );
                    self.suspects.insert(k);
                }
            }
            _ => {
                self.suspects.extend(out.iter().map(Tag::key));
                // A suspect never sent again (e.g. a presence replaced by a newer
                // state) must not keep the window at one for good.
                if self.suspects.len() > self.s.max_inflight + 16 {
                    self.suspects.clear();
                }
            }
        }
    }

    /// Stops trying `tag`: a record is set aside (dead letter), anything else is
    /// dropped and counted; either way it counts as finished.
    fn give_up(&mut self, tag: Tag, r: Refusal) {
        match &tag {
            Tag::Data(seq) => self.set_aside(CURSOR, *seq, r),
            Tag::Merged(id) => {
                if let Some((min_seq, _)) = self.merged_unacked.get(id) {
                    let min_seq = *min_seq;
                    self.set_aside(MERGE_DEAD, min_seq, r);
                }
            }
            Tag::Alarm(id) => self.set_aside(ALARM_CURSOR, *id, r),
            Tag::Redrive(id, consumer, seq) => {
                // Set aside again: the entry goes back to `dead` with one more attempt.
                self.redriving.remove(id);
                self.set_aside(consumer, *seq, r);
                return;
            }
            Tag::Presence(..) | Tag::Status | Tag::Checkpoint(_) => {
                self.f.metrics().dead_letter("mqtt.status", r.reason);
                warn!(reason = r.reason, detail = %r.detail, "MQTT status message given up");
            }
        }
        self.settle(tag);
    }

    /// Queues a dead letter (written with the next cursors), counts and logs it.
    fn set_aside(&mut self, consumer: &'static str, seq: u64, r: Refusal) {
        let now = tokio::time::Instant::now();
        let (quiet, last) = &mut self.dead_quiet;
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            warn!(consumer, seq, reason = r.reason, detail = %r.detail, also_set_aside = *quiet, "MQTT message set aside (dead letter); publishing goes on");
            *quiet = 0;
            *last = Some(now);
        } else {
            *quiet += 1;
        }
        self.f.set_aside(DeadLetter {
            consumer: consumer.to_owned(),
            seq,
            reason: r.reason,
            detail: r.detail,
        });
    }

    /// Queues the entries an operator marked for re-drive (a bounded batch, once
    /// a second while connected).
    async fn read_redrives(&mut self) {
        let (cursors, reader, alarms) = (self.f.cursors(), self.f.reader(), self.alarms.clone());
        let skip: Vec<i64> = self.redriving.iter().copied().collect();
        let opts = self.s.plan.clone();
        let max_packet = self.s.max_packet;
        let read = self
            .f
            .blocking(move || {
                let c = cursors.lock().unwrap_or_else(|e| e.into_inner());
                let mut rows: Vec<DeadLetterRow> = c.redrives(CURSOR, REDRIVE_BATCH)?;
                rows.extend(c.redrives(ALARM_CURSOR, REDRIVE_BATCH)?);
                drop(c);
                let mut out = Vec::new();
                for row in rows.into_iter().filter(|r| !skip.contains(&r.id)) {
                    let planned = if row.consumer == CURSOR {
                        let rec = reader
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .reader()
                            .get(row.seq)?;
                        match rec.map(|r| plan::decide(&r, &opts, max_packet)) {
                            Some(Decision::Publish(p)) => Ok(Some((p.topic, p.payload.clone()))),
                            Some(Decision::Refuse(r)) => Err(r),
                            Some(Decision::Skip) | None => Ok(None),
                        }
                    } else {
                        let ev = alarms
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .events_after(row.seq.saturating_sub(1), 1)?;
                        Ok(ev.into_iter().find(|e| e.id == row.seq).map(|e| {
                            (
                                format!("{}/{}/alarm", opts.prefix, e.mn),
                                e.payload.into_bytes(),
                            )
                        }))
                    };
                    out.push((row, planned));
                }
                Ok::<_, StoreError>(out)
            })
            .await;
        let rows = match read {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "MQTT publisher cannot read dead letters to re-drive");
                return;
            }
        };
        for (row, planned) in rows {
            let consumer = if row.consumer == CURSOR {
                CURSOR
            } else {
                ALARM_CURSOR
            };
            let tag = Tag::Redrive(row.id, consumer, row.seq);
            match planned {
                Ok(Some((topic, payload))) => {
                    info!(
                        id = row.id,
                        consumer,
                        seq = row.seq,
                        "MQTT re-drives a dead letter"
                    );
                    self.redriving.insert(row.id);
                    self.queue(Msg {
                        topic,
                        payload,
                        retain: false,
                        tag,
                    });
                }
                // Nothing to publish any more (e.g. the device is quarantined now).
                Ok(None) => self.f.resolve(row.id),
                Err(r) => self.give_up(tag, r),
            }
        }
    }

    /// Clean stop: no new data; `offline` replaces the retained `online` (a clean
    /// DISCONNECT suppresses the will), and what is in flight gets a moment to be acked.
    /// The data connection gets the same moment for its in-flight publishes and
    /// closes with a DISCONNECT first.
    async fn goodbye(
        &mut self,
        client: &AsyncClient,
        el: &mut EventLoop,
        mut wire: Option<Wire<Tag>>,
    ) {
        self.data.clear();
        self.ctrl.clear();
        self.side.clear();
        self.ctrl.push_back(Msg {
            topic: self.s.gateway_topic(),
            payload: OFFLINE.into(),
            retain: true,
            tag: Tag::Status,
        });
        let deadline = tokio::time::Instant::now() + STOP_DRAIN;
        let mut acked = Vec::new();
        loop {
            if self.pump(client, wire.as_mut()).is_err() {
                break;
            }
            let wire_busy = wire.as_ref().is_some_and(|w| w.len() > 0);
            if self.ctrl.is_empty() && self.in_client == 0 && !wire_busy {
                break;
            }
            let ev = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    r = poll_wire(&mut wire, &mut acked), if wire_busy => r.map(|()| None).map_err(|e| e.to_string()),
                    ev = el.poll() => ev.map(Some).map_err(|e| e.to_string()),
                }
            })
            .await;
            match ev {
                Ok(Ok(Some(ev))) => self.on_event(ev),
                Ok(Ok(None)) => {
                    for tag in acked.drain(..) {
                        self.complete(tag);
                    }
                }
                _ => return,
            }
        }
        if let Some(w) = wire {
            let _ = tokio::time::timeout_at(deadline, w.disconnect()).await;
        }
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout_at(deadline, async {
                loop {
                    match el.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
}

/// Drives the data connection, if there is one (otherwise never ready).
async fn poll_wire(
    wire: &mut Option<Wire<Tag>>,
    acked: &mut Vec<Tag>,
) -> Result<(), wire::WireError> {
    match wire {
        Some(w) => w.poll(acked).await,
        None => std::future::pending().await,
    }
}

/// Polls a fresh event loop until the broker's CONNACK (or an error).
async fn connect(el: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Exec, Store, StoreConfig, SyncMode};

    /// A log of the previous schema (7) held the publisher's alarm-event cursor in
    /// `cursors`. Opened by this build, the row moves to `event_cursors` with its
    /// value and the publisher resumes after that event, not from the first one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_v7_alarm_cursor_moves_to_its_table_and_publishing_resumes_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v7.sqlite");
        let conn = crate::store::file_at_version(&path, 7);
        conn.execute_batch(
            "INSERT INTO alarms (kind, severity, mn, factor, start_ms, seqs, message_zh, message_en) \
             VALUES ('value.stuck', 'warning', 'MN1', 'a21026', 0, '[]', 'z', 'e'); \
             INSERT INTO alarm_events (alarm_id, event, mn, payload) VALUES \
             (1, 'raise', 'MN1', '{\"n\":1}'), (1, 'clear', 'MN1', '{\"n\":2}'), \
             (1, 'raise', 'MN1', '{\"n\":3}'); \
             INSERT INTO cursors (name, seq, updated_at) VALUES ('mqtt.alarms', 2, 7), ('mqtt', 0, 7);",
        )
        .unwrap();
        drop(conn);
        let mut cfg = StoreConfig::new(&path);
        cfg.sync = SyncMode::Off;
        let (h, j) = Store::open(cfg).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let moved: (i64, i64) = conn
            .query_row(
                "SELECT event_id, updated_at FROM event_cursors WHERE name = 'mqtt.alarms'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(moved, (2, 7));
        let left: Vec<String> = conn
            .prepare("SELECT name FROM cursors ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, ["mqtt"], "record cursors only");

        let m = Mqtt {
            settings: MqttSettings::from_config(&MqttSection::default(), Path::new("t")).unwrap(),
            presence: Arc::default(),
        };
        let f = Follower::open(m.plan(), &path, h.feed(), Exec::Pool).unwrap();
        let mut p = m.open(f).unwrap();
        assert_eq!((p.alarm_acked, p.alarm_next), (2, 2));
        p.read_alarms().await;
        // At QoS 1 (the default) alarms go to the data connection's queue.
        let queued: Vec<&[u8]> = p.side.iter().map(|m| m.payload.as_slice()).collect();
        assert_eq!(queued, [b"{\"n\":3}".as_slice()], "resumes after event 2");
        // Acknowledged, the cursor is written to the new table.
        p.settle(Tag::Alarm(3));
        p.positions();
        p.f.stop().await;
        assert_eq!(
            AlarmStore::open(&path)
                .unwrap()
                .event_cursor(ALARM_CURSOR)
                .unwrap(),
            Some(3)
        );
        drop(h);
        j.join().unwrap();
    }
}
