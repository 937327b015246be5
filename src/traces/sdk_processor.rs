//! The OpenTelemetry SDK's side of the span queue: the tracer provider `tracing-opentelemetry`
//! builds its spans with ends them into the same queue the agent spans take.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;

use super::handoff::Message;
use super::span_queue::SpanQueue;

/// The provider's handle on the one processor the agent spans also use.
#[derive(Debug)]
pub(crate) struct SharedProcessor(pub Arc<SpanQueue>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.queue(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.ask(Message::Flush, self.0.flush_timeout)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown(timeout)
    }

    fn set_resource(&mut self, _: &Resource) {
        // Set on the exporter before its thread started (see `traces::build`).
    }
}
