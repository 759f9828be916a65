//! Shared harness for the integration tests: a fresh PostgreSQL database per
//! test and fresh topic names on the real broker.
//!
//! Connection settings come from `DATABASE_URL` (a server-level URL; the
//! harness creates and drops its own databases on it) and `KAFKA_BROKERS`,
//! both set by `scripts/dev.sh test`.

use std::time::Duration;

pub mod cpu;
pub mod gauges;
pub mod pipeline;
pub mod proxy;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

/// The PostgreSQL server URL the tests use.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The broker list the tests use.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A deadline of `within` grown with `TIDINGS_FAULT_SCALE`: larger runs get
/// proportionally longer to reach a condition.
pub fn scaled(within: Duration) -> Duration {
    within * pipeline::scale().max(1) as u32
}

/// Waits until `check` holds, polling every 50 ms; fails naming `what` after
/// `within` (grown with the scale, see [`scaled`]).
pub async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let within = scaled(within);
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < within,
            "{what}: not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A short random suffix for database and topic names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// The per-test time limit: a test still holding its database after
/// `TIDINGS_TEST_TIMEOUT_SECS` (default 300 s, times `TIDINGS_FAULT_SCALE`)
/// hangs; the watchdog names it and aborts the test binary, so that a hang
/// fails the run in minutes instead of stalling it.
#[derive(Debug)]
pub struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    /// Starts watching the calling test (by its thread's name).
    pub fn start() -> Self {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        let limit = Duration::from_secs(
            std::env::var("TIDINGS_TEST_TIMEOUT_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300)
                * pipeline::scale() as u64,
        );
        let watched = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !watched.load(std::sync::atomic::Ordering::Relaxed) {
                if started.elapsed() > limit {
                    // Not eprintln!: the test's output capture would keep it.
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "TIMEOUT: {test} ran past {limit:?}; aborting the test binary"
                    );
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A database name for a process the test spawns (an example, the
/// benchmark), dropped with this value: runs side by side never share one.
/// Watches the test's time like [`TestDb`].
#[derive(Debug)]
pub struct SpawnedDb {
    /// The database's name.
    pub name: String,
    _watchdog: Watchdog,
}

impl SpawnedDb {
    /// A fresh, unique name (the process creates the database).
    pub fn new(prefix: &str) -> Self {
        SpawnedDb {
            name: unique(prefix),
            _watchdog: Watchdog::start(),
        }
    }
}

impl Drop for SpawnedDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A thread of its own: a test's runtime may be the caller.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let options: PgConnectOptions = database_url().parse().expect("DATABASE_URL");
                if let Ok(mut admin) = options.connect().await {
                    let _ = admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// A database created for one test, migrated, and dropped when the value
/// is dropped; the test's time is watched meanwhile ([`Watchdog`]).
#[derive(Debug)]
pub struct TestDb {
    /// A pool connected to the test database.
    pub pool: PgPool,
    /// The database's name.
    pub name: String,
    options: PgConnectOptions,
    _watchdog: Watchdog,
}

impl TestDb {
    /// Creates a fresh database and runs the tidings migrations on it.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        tidings::MIGRATOR
            .run(&db.pool)
            .await
            .expect("running the tidings migrations");
        db
    }

    /// Creates a fresh database without running any migration.
    pub async fn empty() -> TestDb {
        let watchdog = Watchdog::start();
        let server: PgConnectOptions = database_url().parse().expect("DATABASE_URL is a valid URL");
        let name = unique("tidings_test");
        let mut admin = server
            .connect()
            .await
            .expect("connecting to PostgreSQL (is it up? scripts/dev.sh up)");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("creating the test database");
        admin.close().await.ok();
        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await
            .expect("connecting to the test database");
        TestDb {
            pool,
            name,
            options: server.database("postgres"),
            _watchdog: watchdog,
        }
    }

    /// Connection options for the test database (for a second pool or a child process).
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone().database(&self.name)
    }

    /// A URL for the test database, for child processes.
    pub fn url(&self) -> String {
        let base = database_url();
        match base.rfind('/') {
            Some(i) if base[..i].contains("://") && base[..i].matches('/').count() >= 2 => {
                let (head, tail) = base.split_at(i);
                let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
                format!("{head}/{}{query}", self.name)
            }
            _ => format!("{base}/{}", self.name),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database(self.options.clone(), self.name.clone());
    }
}

/// Drops a database from a destructor (on a thread of its own: drop may run
/// inside an async runtime). Failures are ignored: it is only cleanup.
fn drop_database(server: PgConnectOptions, name: String) {
    let dropper = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async move {
            let mut admin = server.connect().await.ok()?;
            admin
                .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .ok()?;
            admin.close().await.ok()
        })
    });
    let _ = dropper.join();
}

/// A store whose topics carry a prefix unique to the test.
pub fn prefixed_store(db: &TestDb) -> tidings::Store {
    store_with_prefix(db).0
}

/// [`prefixed_store`], with the prefix (for runners reading its topics).
pub fn store_with_prefix(db: &TestDb) -> (tidings::Store, String) {
    let prefix = format!("{}.", unique("t"));
    let store = tidings::Store::with_config(
        db.pool.clone(),
        tidings::StoreConfig::default().topic_prefix(&prefix),
    );
    (store, prefix)
}
/// A client configuration for the test broker.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    config
}

/// Creates a topic with `partitions` partitions and returns its name.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    create_topic_named(&name, partitions).await;
    name
}

/// Creates the topic `name` with `partitions` partitions.
pub async fn create_topic_named(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = kafka_config()
        .create()
        .expect("creating a Kafka admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("creating a topic (is the broker up? scripts/dev.sh up)");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code}"));
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    /// The message key.
    pub key: String,
    /// The value parsed as an envelope (`None` when it is not one).
    pub envelope: Option<tidings::RawEnvelope>,
    /// The raw value.
    pub value: String,
    /// Headers as (name, value).
    pub headers: Vec<(String, String)>,
    /// Headers as received: in order, values as bytes.
    pub raw_headers: Vec<(String, Option<Vec<u8>>)>,
    /// Partition and offset.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

/// Reads `topic` from the beginning with a fresh consumer group until at
/// least `at_least` messages arrived and nothing more came for `quiet`, or
/// `deadline` passed. Returns the messages in partition-offset order per
/// partition as consumed.
pub async fn consume(
    topic: &str,
    at_least: usize,
    quiet: Duration,
    deadline: Duration,
) -> Vec<Received> {
    consume_from(&brokers(), topic, at_least, quiet, deadline).await
}

/// [`consume`] from a given broker.
pub async fn consume_from(
    brokers: &str,
    topic: &str,
    at_least: usize,
    quiet: Duration,
    deadline: Duration,
) -> Vec<Received> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    // A consumer that subscribes before its topic exists may not see the
    // topic for minutes (metadata refresh): wait until it exists.
    wait_for_topic(brokers, topic, deadline).await;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("test_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("creating a consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    loop {
        let wait = if out.len() >= at_least {
            quiet
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(message)) => {
                let value =
                    String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|hd| {
                                (
                                    hd.key.to_owned(),
                                    String::from_utf8_lossy(hd.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let raw_headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|hd| (hd.key.to_owned(), hd.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Received {
                    raw_headers,
                    key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    envelope: tidings::RawEnvelope::from_slice(value.as_bytes()).ok(),
                    value,
                    headers,
                    partition: message.partition(),
                    offset: message.offset(),
                });
            }
            // The topic may not exist yet: the relay creates it with its
            // first batch.
            Ok(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            ))) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) if out.len() >= at_least => return out,
            Err(_) => {}
        }
        if started.elapsed() > deadline {
            return out;
        }
    }
}

/// Waits until the cluster knows `topic` (with partitions), asking for the
/// metadata of all topics: a request naming a missing topic could create it.
pub async fn wait_for_topic(brokers: &str, topic: &str, deadline: Duration) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("creating a metadata client");
    let client = std::sync::Arc::new(client);
    let started = std::time::Instant::now();
    loop {
        let exists = {
            let client = std::sync::Arc::clone(&client);
            let topic = topic.to_owned();
            tokio::task::spawn_blocking(move || {
                client
                    .fetch_metadata(None, Duration::from_secs(5))
                    .map(|m| {
                        m.topics()
                            .iter()
                            .any(|t| t.name() == topic && !t.partitions().is_empty())
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        };
        if exists || started.elapsed() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks per-aggregate order and completeness of what a topic delivered.
/// Duplicates are allowed; the first occurrences of each aggregate's
/// sequences must be 1, 2, 3, … `expected[aggregate]`. Returns the number of
/// duplicates seen.
pub fn check_streams(
    received: &[Received],
    expected: &std::collections::BTreeMap<String, u64>,
) -> usize {
    use std::collections::BTreeMap;
    let mut first: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    for message in received {
        let envelope = message
            .envelope
            .as_ref()
            .expect("every message is an envelope");
        assert_eq!(message.key, envelope.aggregate_id, "key = aggregate id");
        let id = envelope.aggregate_id.as_str();
        if seen.insert((id, envelope.sequence)) {
            first.entry(id).or_default().push(envelope.sequence);
        } else {
            duplicates += 1;
        }
    }
    for (aggregate, count) in expected {
        let got = first.get(aggregate.as_str()).cloned().unwrap_or_default();
        assert_eq!(
            got,
            (1..=*count).collect::<Vec<_>>(),
            "stream {aggregate}: order or completeness"
        );
    }
    assert_eq!(first.len(), expected.len(), "no unexpected aggregates");
    duplicates
}

/// The profile's build folder (`target/debug` or `target/release`) this
/// executable was built into (tests live one level lower, in `deps`).
fn build_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.parent().expect("a folder").to_path_buf()
    } else {
        dir
    }
}

/// Events whose outbox row is gone: published (and deleted) so far.
pub async fn published(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM tidings_events e \
         WHERE NOT EXISTS (SELECT 1 FROM tidings_outbox o WHERE o.event_id = e.event_id)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Whether a backend of `pool`'s database waits on a heavyweight lock in a
/// statement containing `statement` (evidence that an interleaving a test
/// sets up has happened).
pub async fn waits_on_lock(pool: &PgPool, statement: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND strpos(query, $1) > 0 AND pid <> pg_backend_pid())",
    )
    .bind(statement)
    .fetch_one(pool)
    .await
    .expect("reading pg_stat_activity")
}

/// Rows waiting in the outbox.
pub async fn outbox_depth(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tidings_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Spawns `bin` with its stderr read line by line into a shared log.
pub fn spawn_logged(
    bin: std::path::PathBuf,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Spawned, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin)
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child.into(), log)
}

/// Waits until `log` has the line a metrics server logs when it listens
/// (`serving /metrics … bound=ADDR`) and returns the address: a process
/// given port 0 picks a free port itself, so no port is chosen and released.
pub async fn logged_address(
    log: &std::sync::Mutex<String>,
    within: Duration,
) -> std::net::SocketAddr {
    let started = std::time::Instant::now();
    loop {
        let found = log.lock().unwrap().lines().find_map(|l| {
            l.contains("serving /metrics")
                .then(|| {
                    l.split("bound=")
                        .nth(1)?
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                })
                .flatten()
        });
        if let Some(addr) = found {
            return addr.trim_matches('"').parse().unwrap();
        }
        assert!(
            started.elapsed() < within,
            "no address logged: {}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so that
/// a failing test or benchmark leaves no relay or runner running behind it.
/// Dereferences to the [`std::process::Child`].
#[derive(Debug)]
pub struct Spawned(std::process::Child);

impl From<std::process::Child> for Spawned {
    fn from(child: std::process::Child) -> Self {
        Spawned(child)
    }
}

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Path of the `tidings` binary, refused when older than the sources it
/// is built from (a test must not exercise a stale build).
pub fn tidings_bin() -> std::path::PathBuf {
    current(
        build_dir().join("tidings"),
        &["framework", "macros", "migrations"],
        "cargo build -p tidings --bin tidings",
    )
}

/// Path of an example binary, refused when older than the sources it is
/// built from (`cargo test --workspace` builds examples; `cargo test -p
/// tidings-tests` does not).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let own = format!("examples/{name}.rs");
    current(
        build_dir().join("examples").join(name),
        &[
            "framework",
            "macros",
            "migrations",
            "examples/src",
            "examples/Cargo.toml",
            &own,
        ],
        "cargo build -p tidings-examples --examples",
    )
}

/// `bin` if it exists and is newer than every file under `sources` (files
/// or folders; their own tests aside).
fn current(bin: std::path::PathBuf, sources: &[&str], build: &str) -> std::path::PathBuf {
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is not built: run `{build}` first", bin.display()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let mut newest: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    let mut pending: Vec<std::path::PathBuf> = sources.iter().map(|d| root.join(d)).collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            // Their own tests are not part of the binaries.
            if path
                .file_name()
                .is_some_and(|n| n == "tests" || n == "target")
            {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if let Ok(modified) = meta.modified()
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    if let Some((modified, source)) = newest {
        assert!(
            modified <= built,
            "{} is older than {}: run `{build}` (or `cargo test --workspace`) first",
            bin.display(),
            source.display()
        );
    }
    bin
}

/// A broker process of the tests' own, with its data in a PostgreSQL
/// database so that it survives a restart: for stopping and restarting the
/// broker under a running pipeline.
#[derive(Debug)]
pub struct OwnBroker {
    /// `127.0.0.1:port`.
    pub address: String,
    storage: String,
    database: String,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    /// Starts a broker on a free loopback port with storage in a fresh database.
    ///
    /// The port is chosen free and released before the broker binds it, so
    /// another process can take it in between: the broker is only taken as
    /// started once the port's listening socket is the broker's own, and a
    /// start that lost its port is tried again on another.
    pub async fn start() -> OwnBroker {
        let database = unique("broker_storage");
        let server: PgConnectOptions = database_url().parse().unwrap();
        let mut admin = server.connect().await.unwrap();
        admin
            .execute(format!("CREATE DATABASE {database}").as_str())
            .await
            .unwrap();
        let host = server.get_host().to_owned();
        let storage = format!(
            "postgres://{}@{host}:{}/{database}?sslmode=disable",
            server.get_username(),
            server.get_port()
        );
        let mut broker = OwnBroker {
            address: String::new(),
            storage,
            database,
            child: None,
        };
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            broker.address = format!("127.0.0.1:{port}");
            if broker.try_resume() {
                return broker;
            }
        }
        panic!("the test broker could not keep a free port in five tries");
    }

    /// Starts the broker process again (after [`OwnBroker::kill`]), on the
    /// same address.
    pub fn resume(&mut self) {
        assert!(
            self.try_resume(),
            "the test broker could not listen on {} again (another process took the port)",
            self.address
        );
    }

    /// Starts the broker process and waits until it listens on its address
    /// itself; false when it exited first (the port was taken).
    fn try_resume(&mut self) -> bool {
        let nisshi = std::env::var("TIDINGS_NISSHI").unwrap_or_else(|_| {
            format!(
                "{}/.cache/tidings/nisshi-0.8.1/bin/nisshi",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let url = format!("tcp://{}", self.address);
        let child = std::process::Command::new(nisshi)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--group-initial-rebalance-delay",
                "100ms",
                "--storage-engine",
                &self.storage,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting nisshi (scripts/dev.sh up installs it)");
        let pid = child.id();
        self.child = Some(child);
        let port: u16 = self.address.rsplit(':').next().unwrap().parse().unwrap();
        let child = self.child.as_mut().unwrap();
        let mut wait = move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if listens_on(pid, port) {
                    return true;
                }
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the test broker did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        // Inside a multi-threaded runtime the wait must not hold up a worker
        // (the pipeline under test runs on them).
        let listening = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        if !listening {
            self.child = None;
        }
        listening
    }

    /// Freezes the broker process (SIGSTOP): its sockets stay open and
    /// nothing answers, as with a broker stuck or cut off.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the broker runs");
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Kills the broker process (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`
/// (from `/proc/net/tcp` and the process's file descriptors).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, state 0A (LISTEN), inode
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        self.kill();
        drop_database(database_url().parse().unwrap(), self.database.clone());
    }
}
