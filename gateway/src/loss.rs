//! Loss accounting from the device's own message counter (`seq`). Pure, no I/O.
//!
//! A device numbers its messages 0, 1, 2, ... from boot. From that the gateway tells, per
//! device, how many messages were lost on the way (a gap), duplicated (a number seen again,
//! typically a QoS 1 redelivery) or late (a number below the newest that had been counted as
//! lost). `0` after a higher number, or a drop of [`WINDOW`] or more, is a restart of the device:
//! counting starts over without a loss.

/// How far below the newest number the tracker remembers which numbers it has seen.
pub const WINDOW: u64 = 64;

/// What one message's `seq` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq {
    /// The first number seen from this device.
    First,
    /// The next number.
    InOrder,
    /// Numbers were skipped: that many messages are lost (so far).
    Gap(u64),
    /// A number already seen: the message is a duplicate.
    Duplicate,
    /// A number below the newest that was missing: it arrived late, and is no longer lost.
    Late,
    /// The device restarted its count.
    Restart,
}

/// Per-device memory of recent numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    newest: Option<u64>,
    /// Bit `i` set: number `newest - i` was seen.
    seen: u64,
}

impl SeqTracker {
    /// Classifies `seq` and remembers it.
    pub fn observe(&mut self, seq: u64) -> Seq {
        let Some(newest) = self.newest else {
            self.start(seq);
            return Seq::First;
        };
        if seq > newest {
            let ahead = seq - newest;
            self.seen = if ahead >= WINDOW {
                0
            } else {
                self.seen << ahead
            };
            self.seen |= 1;
            self.newest = Some(seq);
            return if ahead == 1 {
                Seq::InOrder
            } else {
                Seq::Gap(ahead - 1)
            };
        }
        let back = newest - seq;
        if (seq == 0 && back > 0) || back >= WINDOW {
            self.start(seq);
            return Seq::Restart;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            Seq::Duplicate
        } else {
            self.seen |= bit;
            Seq::Late
        }
    }

    fn start(&mut self, seq: u64) {
        self.newest = Some(seq);
        self.seen = 1;
    }
}

/// Loss counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LossCounters {
    /// Messages missing from the sequence (a late arrival takes one back).
    pub lost: u64,
    /// Messages received twice or more.
    pub duplicated: u64,
    /// Messages that arrived after a higher number.
    pub out_of_order: u64,
    /// Times the device started counting again.
    pub restarts: u64,
}

impl LossCounters {
    /// Updates the counters for one classified message.
    pub fn count(&mut self, seq: Seq) {
        match seq {
            Seq::First | Seq::InOrder => {}
            Seq::Gap(n) => self.lost += n,
            Seq::Duplicate => self.duplicated += 1,
            Seq::Late => {
                self.lost = self.lost.saturating_sub(1);
                self.out_of_order += 1;
            }
            Seq::Restart => self.restarts += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> (Vec<Seq>, LossCounters) {
        let mut t = SeqTracker::default();
        let mut c = LossCounters::default();
        let out = seqs
            .iter()
            .map(|&s| {
                let o = t.observe(s);
                c.count(o);
                o
            })
            .collect();
        (out, c)
    }

    #[test]
    fn a_device_that_skips_and_repeats() {
        let (out, c) = run(&[0, 1, 2, 5, 5, 6, 6, 6, 7, 10]);
        use Seq::*;
        assert_eq!(
            out,
            [
                First,
                InOrder,
                InOrder,
                Gap(2),
                Duplicate,
                InOrder,
                Duplicate,
                Duplicate,
                InOrder,
                Gap(2)
            ]
        );
        assert_eq!(
            c,
            LossCounters {
                lost: 4,
                duplicated: 3,
                out_of_order: 0,
                restarts: 0
            }
        );
    }

    #[test]
    fn a_late_message_is_no_longer_lost_and_a_second_copy_is_a_duplicate() {
        let (out, c) = run(&[10, 11, 14, 12, 12, 13]);
        use Seq::*;
        assert_eq!(out, [First, InOrder, Gap(2), Late, Duplicate, Late]);
        assert_eq!(
            c,
            LossCounters {
                lost: 0,
                duplicated: 1,
                out_of_order: 2,
                restarts: 0
            }
        );
    }

    #[test]
    fn restarts_start_over_without_a_loss() {
        let (out, c) = run(&[500, 501, 0, 1, 2, 3, 900, 3]);
        use Seq::*;
        assert_eq!(
            out,
            [
                First,
                InOrder,
                Restart,
                InOrder,
                InOrder,
                InOrder,
                Gap(896),
                Restart
            ]
        );
        assert_eq!(c.restarts, 2);
        assert_eq!(c.lost, 896);
    }

    #[test]
    fn a_jump_past_the_window_forgets_old_numbers() {
        let (out, _) = run(&[0, 100, 99, 100]);
        use Seq::*;
        assert_eq!(out, [First, Gap(99), Late, Duplicate]);
    }
}
