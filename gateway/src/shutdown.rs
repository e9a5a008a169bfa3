//! Graceful shutdown: one trigger, any number of listeners.
//!
//! Every task takes a [`Signal`] and stops at its next safe point once it resolves; the
//! owner of the [`Trigger`] decides when.

use tokio::sync::watch;

/// Fires the shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves once the shutdown has been fired (or the trigger dropped).
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<bool>);

/// A new trigger and its signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    /// Tells every signal to resolve.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Signal {
    /// Waits for the shutdown.
    pub async fn wait(mut self) {
        // An error means the trigger is gone, which is a shutdown too.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// True once the shutdown has been fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Calls `tick` every `period`, the first time at once, until the shutdown.
    pub async fn every(self, period: std::time::Duration, mut tick: impl FnMut()) {
        let mut interval = tokio::time::interval(period);
        let wait = self.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return,
                _ = interval.tick() => tick(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_signal_resolves_after_fire() {
        let (trigger, signal) = channel();
        let other = signal.clone();
        assert!(!signal.is_fired());
        let waiter = tokio::spawn(other.wait());
        trigger.fire();
        waiter.await.unwrap();
        assert!(signal.is_fired());
        signal.wait().await;
    }

    #[tokio::test]
    async fn periodic_work_runs_until_the_shutdown() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::Duration;
        let (trigger, signal) = channel();
        let ticks = std::sync::Arc::new(AtomicU32::new(0));
        let counted = ticks.clone();
        let task = tokio::spawn(signal.every(Duration::from_millis(5), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while ticks.load(Ordering::Relaxed) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "no ticks");
            tokio::task::yield_now().await;
        }
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops after the shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn dropping_the_trigger_also_shuts_down() {
        let (trigger, signal) = channel();
        drop(trigger);
        signal.wait().await;
    }
}
