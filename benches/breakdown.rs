use std::hint::black_box;
use std::time::Duration;
use agent_telemetry::{AgentTelemetry, TracesExporter};
use criterion::Criterion;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Dispatch;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

#[derive(Debug)]
struct Discard;
impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult { black_box(batch); Ok(()) }
}
#[inline(never)]
fn agent_execution() {
    let span = tracing::info_span!("agent_execution", agent_name = "backend-engineer", task = "Implement API");
    let _entered = span.enter();
    black_box(&span);
}
fn run(c: &mut Criterion, name: &str, d: Dispatch) {
    c.bench_function(name, |b| tracing::dispatcher::with_default(&d, || b.iter(agent_execution)));
}
fn main() {
    let mut c = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).configure_from_args();
    {
        let (layer, _g) = AgentTelemetry::builder().ignore_environment().without_metrics_server()
            .with_log_writer(std::io::sink()).with_traces_exporter(TracesExporter::None).build().unwrap();
        run(&mut c, "ours_no_traces", Dispatch::new(tracing_subscriber::registry().with(layer)));
    }
    {
        let provider = SdkTracerProvider::builder().with_batch_exporter(Discard).build();
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("x")).with_threads(false).with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.name() == "agent_execution"));
        run(&mut c, "otel_only", Dispatch::new(tracing_subscriber::registry().with(otel)));
        let _ = provider.shutdown();
    }
    {
        let (layer, _g) = AgentTelemetry::builder().ignore_environment().without_metrics_server()
            .with_log_writer(std::io::sink()).with_span_exporter(Discard).build().unwrap();
        run(&mut c, "ours_full", Dispatch::new(tracing_subscriber::registry().with(layer)));
    }
    {
        let (fast, _h, _mp) = proto::Fast::new();
        let f = fast.with_filter(tracing_subscriber::filter::filter_fn(|m| m.name() == "agent_execution"));
        run(&mut c, "proto_fast", Dispatch::new(tracing_subscriber::registry().with(f)));
    }
    run(&mut c, "registry", Dispatch::new(tracing_subscriber::registry()));
}

mod proto {
    use std::cell::RefCell;
    use std::sync::mpsc::{sync_channel, SyncSender};
    use std::time::{Instant, SystemTime};
    use opentelemetry::trace::{SpanContext, SpanId, TraceId, TraceFlags, TraceState, TraceContextExt};
    use opentelemetry::{Context as OtelContext, ContextGuard, KeyValue};
    use opentelemetry::metrics::{Counter, Histogram, MeterProvider};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id};
    use tracing::Subscriber;
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    pub struct Rec { pub agent_name: String, pub task: String, pub start: SystemTime, pub dur: std::time::Duration, pub sc: SpanContext, pub parent: SpanId }
    struct State { started: Instant, start: SystemTime, agent_name: String, task: String, cx: OtelContext, parent: SpanId }
    #[derive(Default)] struct F { a: Option<String>, t: Option<String> }
    impl Visit for F {
        fn record_str(&mut self, f: &Field, v: &str) { match f.name() { "agent_name" => self.a = Some(v.to_owned()), "task" => self.t = Some(v.to_owned()), _ => {} } }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }
    thread_local! { static GUARDS: RefCell<Vec<(Id, ContextGuard)>> = const { RefCell::new(Vec::new()) }; }
    pub struct Fast { pub tx: SyncSender<Rec>, pub counter: Counter<u64>, pub hist: Histogram<f64>, pub labels: Vec<KeyValue>, pub name_labels: Vec<KeyValue> }
    impl Fast {
        pub fn new() -> (Self, std::thread::JoinHandle<()>, opentelemetry_sdk::metrics::SdkMeterProvider) {
            let (tx, rx) = sync_channel::<Rec>(2048);
            let h = std::thread::spawn(move || { loop { match rx.try_recv() { Ok(r) => { std::hint::black_box(r); } Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::sleep(std::time::Duration::from_millis(5)), Err(_) => return } } });
            let mp = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
            let m = mp.meter("x");
            let counter = m.u64_counter("agent_executions").build();
            let hist = m.f64_histogram("agent_execution_duration").with_boundaries(vec![0.1,0.5,1.0,2.0,5.0,10.0,30.0,60.0]).build();
            (Fast { tx, counter, hist, labels: vec![KeyValue::new("agent_name","backend-engineer"), KeyValue::new("status","success")], name_labels: vec![KeyValue::new("agent_name","backend-engineer")] }, h, mp)
        }
    }
    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Fast {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let mut f = F::default();
            attrs.record(&mut f);
            let parent = OtelContext::map_current(|c| c.span().span_context().span_id());
            let sc = SpanContext::new(TraceId::from(fastrand::u128(..)), SpanId::from(fastrand::u64(..)), TraceFlags::SAMPLED, false, TraceState::NONE);
            let cx = OtelContext::new().with_remote_span_context(sc);
            let st = State { started: Instant::now(), start: SystemTime::now(), agent_name: f.a.unwrap_or_default(), task: f.t.unwrap_or_default(), cx, parent };
            ctx.span(id).unwrap().extensions_mut().insert(st);
        }
        fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
            let span = ctx.span(id).unwrap();
            let cx = span.extensions().get::<State>().map(|s| s.cx.clone());
            if let Some(cx) = cx { let g = cx.attach(); GUARDS.with(|s| s.borrow_mut().push((id.clone(), g))); }
        }
        fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
            GUARDS.with(|s| { let mut s = s.borrow_mut(); if let Some(p) = s.iter().rposition(|(i, _)| i == id) { s.remove(p); } });
        }
        fn on_close(&self, id: Id, ctx: Context<'_, S>) {
            let span = ctx.span(&id).unwrap();
            let st = span.extensions_mut().remove::<State>().unwrap();
            let dur = st.started.elapsed();
            self.counter.add(1, &self.labels);
            self.hist.record(dur.as_secs_f64(), &self.name_labels);
            let sc = st.cx.span().span_context().clone();
            let _ = self.tx.try_send(Rec { agent_name: st.agent_name, task: st.task, start: st.start, dur, sc, parent: st.parent });
        }
    }
}
