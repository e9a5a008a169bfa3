//! What happens at the gateway, as it happens, for whoever listens: the status page's live
//! updates and Home Assistant discovery. Ingest sends each event on a broadcast channel only
//! while someone listens; a listener that falls behind misses events (it is told how many)
//! and reads the state again, so that no listener can slow ingest down.

use std::sync::Arc;

use crate::alert::AlertDoc;
use crate::rules::{Millis, Rule};

/// Events kept for a slow listener before it misses some.
pub const CAPACITY: usize = 1024;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An alert transition, as published.
    Alert(Arc<AlertDoc>),
    /// A device said it is online or offline, or came back with a reading after saying it
    /// was offline.
    Presence {
        /// The device.
        device: Arc<str>,
        /// Online now.
        online: bool,
        /// When, wall clock ms.
        at: Millis,
    },
    /// A device reported a metric for the first time since the gateway started (or since it
    /// was forgotten).
    Stream {
        /// The device.
        device: Arc<str>,
        /// The metric.
        metric: Arc<str>,
    },
    /// Devices forgotten after `gateway.forget_after` of silence.
    Forgotten(Arc<[Box<str>]>),
    /// The rules in force changed (a reload).
    Rules(Arc<[Rule]>),
}

/// The sending side, cheap to clone.
pub type Sender = tokio::sync::broadcast::Sender<Event>;

/// A channel with room for [`CAPACITY`] events per listener.
pub fn channel() -> Sender {
    tokio::sync::broadcast::channel(CAPACITY).0
}
