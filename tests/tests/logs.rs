//! How much a runner logs while the broker is away: a line, then a summary
//! per interval, never a line per retry. A test binary of its own, since it
//! installs the process's tracing subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig};
use tidings_tests::TestDb;
use tidings_tests::pipeline::CounterView;
use tracing_subscriber::layer::SubscriberExt;

/// Counts warnings (and worse) written by tidings, keeping the last few
/// (target and fields) to show when there are too many.
struct Count(Arc<AtomicU64>, Arc<std::sync::Mutex<Vec<String>>>);

/// An event's fields as text.
struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("tidings") && *meta.level() <= tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
            let mut fields = Fields(meta.target().to_owned());
            event.record(&mut fields);
            let mut last = self.1.lock().unwrap();
            if last.len() >= 5 {
                last.remove(0);
            }
            last.push(fields.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_logs_a_bounded_number_of_lines_while_the_broker_is_away() {
    let warnings = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Count(Arc::clone(&warnings), Arc::clone(&last))),
    )
    .expect("the only subscriber of this test binary");
    let mut broker = tidings_tests::OwnBroker::start().await;
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let config = RunnerConfig::new(KafkaConfig::new(&broker.address))
        .topic_prefix(format!("{}.", tidings_tests::unique("t")))
        .max_backoff(Duration::from_secs(1));
    let runner = Runner::new(db.pool.clone(), CounterView, config).unwrap();
    let stats = runner.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    tidings_tests::wait_until("consuming", Duration::from_secs(30), async || {
        stats.assigned.load(Ordering::Relaxed) > 0
    })
    .await;
    let before = warnings.load(Ordering::Relaxed);
    broker.kill();
    let outage = Duration::from_secs(8);
    let started = Instant::now();
    tokio::time::sleep(outage).await;
    let during = warnings.load(Ordering::Relaxed) - before;
    println!("{during} warnings in {:?} of outage", started.elapsed());
    assert!(during > 0, "the outage was noticed");
    assert!(
        during <= 4,
        "a line and a summary per interval, not one per retry: {during}; the last ones: {:#?}",
        last.lock().unwrap()
    );
    broker.resume();
    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
}
