//! Tracing spans of a job's actors, captured by a `tracing_subscriber` layer
//! while a small job trains on this test's thread (a current-thread runtime
//! runs every actor here, so a thread-local subscriber sees them all): the
//! job runs in a `job{job}` span under the caller's, each actor in a child
//! span named by its role with its index; with debug on, every (step,
//! partition) a trainer computes has a `step` span; with debug off there are
//! none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use phalanx::{JobConfig, PreparedJob};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One span as it was opened: its name, its fields and its parent's name.
#[derive(Clone, Debug)]
struct Opened {
    name: &'static str,
    fields: BTreeMap<&'static str, String>,
    parent: Option<&'static str>,
}

/// Records every span opened.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Opened>>>);

struct Fields(BTreeMap<&'static str, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields(BTreeMap::new());
        attrs.record(&mut fields);
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name());
        self.0.lock().unwrap().push(Opened { name: attrs.metadata().name(), fields: fields.0, parent });
    }
}

fn job() -> JobConfig {
    JobConfig {
        epochs: Some(2),
        partitions: 4,
        trainers: 2,
        checkpoint_every: 5,
        checkpoint_min_interval_ms: 0,
        ..JobConfig::default()
    }
}

/// Train `job()` with `level` as the most verbose level captured; the spans opened.
async fn spans_of_a_job(level: LevelFilter) -> Vec<Opened> {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(level));
    let _default = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!("test_job");
    let trained = tracing::Instrument::instrument(phalanx::train(job(), |_| {}), span).await;
    trained.expect("the job trains");
    let spans = capture.0.lock().unwrap().clone();
    spans
}

#[tokio::test(flavor = "current_thread")]
async fn every_actor_has_a_span_and_every_computed_step_a_debug_span_with_its_step() {
    let prepared = PreparedJob::new(job()).unwrap();
    let total_steps = prepared.schedule.total_steps();
    assert!(total_steps > 5, "a few steps: {total_steps}");
    let spans = spans_of_a_job(LevelFilter::DEBUG).await;

    // The job's span under the caller's, one span per actor instance under it, named by its role.
    let jobs: Vec<&Opened> = spans.iter().filter(|s| s.name == "job").collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].fields.contains_key("job") && jobs[0].parent == Some("test_job"), "{jobs:?}");
    let actors = |role: &str, index: &str| -> BTreeSet<String> {
        spans.iter().filter(|s| s.name == role).map(|s| s.fields.get(index).cloned().unwrap_or_default()).collect()
    };
    let all = |n: u32| (0..n).map(|i| i.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(actors("trainer", "trainer"), all(2));
    assert_eq!(actors("shard", "partition"), all(4));
    assert_eq!(actors("aggregator", "range"), all(1));
    for s in spans.iter().filter(|s| ["trainer", "shard", "aggregator"].contains(&s.name)) {
        assert_eq!(s.parent, Some("job"), "{s:?}");
    }

    // Every (step, partition) a trainer computed has its step span in that trainer's span: one
    // span per owned node of the reduction tree (its first partition and how many it covers).
    let computed: BTreeSet<(u64, u32)> = spans
        .iter()
        .filter(|s| s.name == "step" && s.parent == Some("trainer"))
        .flat_map(|s| {
            let (step, first): (u64, u32) = (s.fields["step"].parse().unwrap(), s.fields["partition"].parse().unwrap());
            let count: u32 = s.fields["partitions"].parse().unwrap();
            (first..first + count).map(move |p| (step, p))
        })
        .collect();
    let expected: BTreeSet<(u64, u32)> = (0..total_steps).flat_map(|s| (0..4).map(move |p| (s, p))).collect();
    assert_eq!(computed, expected);
    // Aggregators and shards work in step spans too.
    for role in ["aggregator", "shard"] {
        let steps = spans.iter().filter(|s| s.name == "step" && s.parent == Some(role));
        assert!(steps.clone().count() > 0 && steps.clone().all(|s| s.fields.contains_key("step")), "{role}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn step_spans_are_not_opened_unless_debug_is_on() {
    let spans = spans_of_a_job(LevelFilter::INFO).await;
    assert!(spans.iter().any(|s| s.name == "trainer"), "actor spans are info: {spans:?}");
    assert!(!spans.iter().any(|s| s.name == "step"), "no step span at info level");
}
