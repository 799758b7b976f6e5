//! An engine's live load, published by its step loop and read by the budget planner on
//! request tasks: lock-free atomics, written by one thread, read by many.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Smoothing of the moving averages: each new measurement weighs this much.
const EWMA_WEIGHT: f64 = 0.2;

/// Written only by the model thread; any thread may take a [`LoadSnapshot`].
#[derive(Debug)]
pub struct LoadMeter {
    origin: Instant,
    /// Nanoseconds after `origin` when the decode call now running began; 0 when none is.
    /// A stalled step shows here at once, long before it ends and enters the averages.
    step_started_ns: AtomicU64,
    slots: AtomicU64,
    live: AtomicU64,
    waiting: AtomicU64,
    /// Prompt tokens not yet in the KV cache: queued requests' and prefilling ones' rest.
    pending_prompt_tokens: AtomicU64,
    /// f64 bits: seconds per prompt token over steps that carried prompt work (times are
    /// averaged, not rates, so one slow step weighs as much as it costs).
    prefill_s_per_token: AtomicU64,
    /// f64 bits: seconds per decode step.
    step_s: AtomicU64,
    /// f64 bits: seconds from admission to finish of a sequence.
    sequence_s: AtomicU64,
}

/// One consistent-enough reading of a [`LoadMeter`] (fields are read one by one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSnapshot {
    pub slots: u64,
    pub live: u64,
    pub waiting: u64,
    pub pending_prompt_tokens: u64,
    /// Zero until measured.
    pub prefill_s_per_token: f64,
    pub step_s: f64,
    pub sequence_s: f64,
    /// How long the decode call now running has taken so far.
    pub step_running_s: f64,
}

fn load_f64(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

/// Folds `sample` into the average in `cell`; the first sample is taken as is.
fn fold(cell: &AtomicU64, sample: f64) {
    let old = load_f64(cell);
    let new = if old == 0.0 {
        sample
    } else {
        old + EWMA_WEIGHT * (sample - old)
    };
    cell.store(new.to_bits(), Ordering::Relaxed);
}

impl LoadMeter {
    pub fn new(slots: u32) -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            origin: Instant::now(),
            step_started_ns: zero(),
            slots: AtomicU64::new(u64::from(slots)),
            live: zero(),
            waiting: zero(),
            pending_prompt_tokens: zero(),
            prefill_s_per_token: zero(),
            step_s: zero(),
            sequence_s: zero(),
        }
    }

    /// A decode call begins (`true`) or ends (`false`).
    pub fn step_running(&self, running: bool) {
        let ns = if running {
            (self.origin.elapsed().as_nanos() as u64).max(1)
        } else {
            0
        };
        self.step_started_ns.store(ns, Ordering::Relaxed);
    }

    pub fn set_occupancy(&self, live: usize, waiting: usize, pending_prompt_tokens: usize) {
        self.live.store(live as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        self.pending_prompt_tokens
            .store(pending_prompt_tokens as u64, Ordering::Relaxed);
    }

    /// A request entered the queue (called by `submit`, before the model thread sees it).
    pub fn queued(&self, prompt_tokens: u32) {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.pending_prompt_tokens
            .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
    }

    /// One decode call took `elapsed` for `prompt_tokens` of prefill and `decode_tokens`
    /// generating sequences. In a mixed call the decode share is taken to cost one
    /// measured step, and the rest is prefill.
    pub fn record_step(&self, elapsed: Duration, prompt_tokens: usize, decode_tokens: usize) {
        let seconds = elapsed.as_secs_f64();
        if seconds <= 0.0 {
            return;
        }
        if prompt_tokens == 0 {
            fold(&self.step_s, seconds);
            return;
        }
        let decode_share = if decode_tokens > 0 {
            load_f64(&self.step_s)
        } else {
            0.0
        };
        // Never credit prefill with less than a tenth of the call: a noisy step average
        // must not make prompts look free.
        let prefill_s = (seconds - decode_share).max(seconds * 0.1);
        fold(&self.prefill_s_per_token, prefill_s / prompt_tokens as f64);
    }

    pub fn record_sequence(&self, lifetime: Duration) {
        fold(&self.sequence_s, lifetime.as_secs_f64());
    }

    pub fn snapshot(&self) -> LoadSnapshot {
        let started_ns = self.step_started_ns.load(Ordering::Relaxed);
        let step_running_s = if started_ns == 0 {
            0.0
        } else {
            let now_ns = self.origin.elapsed().as_nanos() as u64;
            now_ns.saturating_sub(started_ns) as f64 / 1e9
        };
        LoadSnapshot {
            step_running_s,
            slots: self.slots.load(Ordering::Relaxed),
            live: self.live.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            pending_prompt_tokens: self.pending_prompt_tokens.load(Ordering::Relaxed),
            prefill_s_per_token: load_f64(&self.prefill_s_per_token),
            step_s: load_f64(&self.step_s),
            sequence_s: load_f64(&self.sequence_s),
        }
    }
}

impl LoadSnapshot {
    /// Expected time to the first token of a new request with `prompt_tokens`:
    /// waiting for a slot, prefilling everything queued ahead plus its own prompt, and the
    /// step that samples its first token. Unmeasured rates count as free (the engines
    /// measure themselves at start-up; the watchdog catches what prediction misses).
    /// A decode call that has run longer than the average step stands in for the
    /// average: a stalled tier is seen while it stalls.
    pub fn predict_ttft(&self, prompt_tokens: u32) -> Duration {
        let free = self.slots.saturating_sub(self.live);
        // Requests that must leave before this one gets a slot.
        let must_finish = (self.waiting + 1).saturating_sub(free);
        let slot_wait = if must_finish == 0 || self.sequence_s == 0.0 || self.slots == 0 {
            0.0
        } else {
            // Slots turn over at slots / sequence_s per second.
            must_finish as f64 * self.sequence_s / self.slots as f64
        };
        let prefill = (self.pending_prompt_tokens + u64::from(prompt_tokens)) as f64
            * self.prefill_s_per_token;
        let step = self.step_s.max(self.step_running_s);
        Duration::from_secs_f64(slot_wait + prefill + step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> LoadSnapshot {
        LoadSnapshot {
            slots: 4,
            live: 0,
            waiting: 0,
            pending_prompt_tokens: 0,
            prefill_s_per_token: 0.001,
            step_s: 0.05,
            sequence_s: 2.0,
            step_running_s: 0.0,
        }
    }

    #[test]
    fn idle_engine_predicts_prefill_plus_one_step() {
        let ttft = snapshot().predict_ttft(500);
        assert!((ttft.as_secs_f64() - 0.55).abs() < 1e-9, "{ttft:?}");
    }

    #[test]
    fn queued_prompts_ahead_add_their_prefill() {
        let load = LoadSnapshot {
            live: 1,
            waiting: 1,
            pending_prompt_tokens: 1000,
            ..snapshot()
        };
        let ttft = load.predict_ttft(500);
        assert!((ttft.as_secs_f64() - 1.55).abs() < 1e-9, "{ttft:?}");
    }

    #[test]
    fn full_slots_add_the_wait_for_a_slot() {
        let load = LoadSnapshot {
            live: 4,
            waiting: 3,
            ..snapshot()
        };
        // Four must finish before this one gets a slot; slots turn over at 4 per 2 s.
        let ttft = load.predict_ttft(0);
        assert!((ttft.as_secs_f64() - 2.05).abs() < 1e-9, "{ttft:?}");
    }

    #[test]
    fn unmeasured_engine_predicts_zero() {
        assert_eq!(LoadSnapshot::default().predict_ttft(1000), Duration::ZERO);
    }

    #[test]
    fn averages_move_towards_new_samples() {
        let meter = LoadMeter::new(2);
        meter.record_step(Duration::from_millis(100), 0, 1);
        meter.record_step(Duration::from_millis(200), 0, 4);
        let step = meter.snapshot().step_s;
        assert!((step - 0.12).abs() < 1e-9, "{step}");
    }

    #[test]
    fn mixed_steps_credit_prefill_with_the_time_beyond_a_decode_step() {
        let meter = LoadMeter::new(2);
        meter.record_step(Duration::from_millis(50), 0, 2);
        // 150 ms for 100 prompt tokens plus decoding: 100 ms of it was prefill.
        meter.record_step(Duration::from_millis(150), 100, 2);
        let per_token = meter.snapshot().prefill_s_per_token;
        assert!((per_token - 0.001).abs() < 1e-9, "{per_token}");
    }

    #[test]
    fn a_step_running_long_counts_as_the_step_time() {
        let stalled = LoadSnapshot {
            step_running_s: 3.0,
            ..snapshot()
        };
        let ttft = stalled.predict_ttft(0);
        assert!((ttft.as_secs_f64() - 3.0).abs() < 1e-9, "{ttft:?}");
        // A short running step does not lower the average.
        let busy = LoadSnapshot {
            step_running_s: 0.01,
            ..snapshot()
        };
        assert!((busy.predict_ttft(0).as_secs_f64() - 0.05).abs() < 1e-9);
    }

    #[test]
    fn running_step_is_visible_in_a_snapshot_until_it_ends() {
        let meter = LoadMeter::new(1);
        meter.step_running(true);
        std::thread::sleep(Duration::from_millis(20));
        assert!(meter.snapshot().step_running_s >= 0.02);
        meter.step_running(false);
        assert_eq!(meter.snapshot().step_running_s, 0.0);
    }
}
