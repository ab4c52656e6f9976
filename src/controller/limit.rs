//! How many writes of a layer are in flight at once, across every reconcile: a limit that follows
//! what the API server says of its load.
//!
//! The limit starts at `--write-concurrency` and moves between 1 and `--write-concurrency-max`:
//! - It goes up by half after each window of answered writes that filled it (at least [`MIN_WINDOW`]
//!   writes, twice the limit, with on average at least [`FILLED`] of it in flight) while the API server
//!   answers in time: crosstrace writes as fast as the API server takes its writes, up to the ceiling
//!   the admin set.
//! - It comes down when the API server says it is loaded: by half at once on an answer that says it is
//!   overloaded (429, 503, 504, once the client's own retries gave up), only once for the writes that
//!   were in flight together (their answers say the same thing); by a quarter after a window whose
//!   writes took [`SLOW`] on average (requests queued by API Priority and Fairness wait before they
//!   are refused). After coming down it stays for [`HOLD`] windows before it goes up again.
//!
//! Measured and not kept: a limit that followed the throughput it bought (mean in flight over mean
//! latency per window, trying a neighbour in paired windows and keeping it when it wrote 5% more, or as
//! much with fewer). On this project's 2-core bench cluster the throughput of windows at the same limit
//! varied from 97 to 315 writes per second with the workloads' own controllers working, more than any
//! step's effect, and the limit wandered between 4 and 32 (e2e/bench/RESULTS.md).
//!
//! With `--write-concurrency-max` equal to `--write-concurrency`, the limit is fixed: it moves for
//! nothing (the client still waits as a 429's `Retry-After` asks).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Windows the limit stays at after it came down.
pub const HOLD: u32 = 8;
/// A window whose writes took this long on average brings the limit down.
pub const SLOW: Duration = Duration::from_secs(1);
/// The fewest writes a window has.
pub const MIN_WINDOW: u32 = 32;
/// A window whose writes filled less than this share of the limit (on average) leaves it: it says
/// nothing of more writes in flight.
pub const FILLED: f64 = 0.75;
/// A window whose last write is longer ago than this is dropped: it measured another moment.
const STALE: Duration = Duration::from_secs(2);

/// The adaptive limit of one layer's writes; shared by every reconcile.
#[derive(Debug)]
pub struct WriteLimit {
    /// Shows the limit (the layer's `crosstrace_write_limit`), when it is exported.
    gauge: Option<(&'static str, prometheus_client::metrics::gauge::Gauge)>,
    floor: usize,
    ceiling: usize,
    state: Mutex<State>,
    room: Notify,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// Moves on with every change of the limit: a write is measured against the limit it started under.
    epoch: u64,
    window: Window,
    /// Windows left before the limit goes up again.
    hold: u32,
}

/// Writes measured together.
#[derive(Debug, Default)]
struct Window {
    writes: u32,
    /// The writes in flight when each started, summed.
    in_flight: f64,
    /// Their latencies, summed.
    seconds: f64,
    /// When the last one was answered.
    last: Option<Instant>,
}

/// What a finished write tells the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered (success or an ordinary refusal, e.g. a conflict): its latency is measured.
    Answered,
    /// The API server is overloaded (429, 503, 504).
    Overloaded,
}

impl Answer {
    /// What a write's result says of the API server's load.
    pub fn of<T>(result: &super::apply::Result<T>) -> Self {
        match result {
            Err(super::apply::Error::Kube(kube::Error::Api(status))) if [429, 503, 504].contains(&status.code) => {
                Self::Overloaded
            }
            _ => Self::Answered,
        }
    }
}

/// A write in flight; its place is given back when it is dropped (also when the write is abandoned).
#[derive(Debug)]
pub struct Permit {
    limit: Arc<WriteLimit>,
    started: Instant,
    in_flight: usize,
    epoch: u64,
}

impl Permit {
    /// The write ended with `answer`: the limit takes it in.
    pub fn finish(self, answer: Answer) {
        self.limit.took(&self, answer, Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limit.lock();
        state.in_flight -= 1;
        drop(state);
        self.limit.room.notify_waiters();
    }
}

impl WriteLimit {
    /// Starts at `start` and adapts between 1 and `ceiling`; a `ceiling` not above `start` fixes it.
    pub fn new(start: usize, ceiling: usize) -> Self {
        let start = start.max(1);
        let fixed = ceiling <= start;
        Self {
            gauge: None,
            floor: if fixed { start } else { 1 },
            ceiling: ceiling.max(start),
            state: Mutex::new(State { limit: start, in_flight: 0, epoch: 0, window: Window::default(), hold: 0 }),
            room: Notify::new(),
        }
    }

    /// Shows the limit in `gauge` (and its moves in the debug log), as the limit of `layer`'s writes.
    pub fn shown_in(mut self, layer: &'static str, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(i64::try_from(self.limit()).unwrap_or(i64::MAX));
        self.gauge = Some((layer, gauge));
        self
    }

    /// Always `n`.
    pub fn fixed(n: usize) -> Self {
        Self::new(n, n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many writes may be in flight now.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// A place for one more write, if the limit has room now.
    pub fn try_start(self: &Arc<Self>) -> Option<Permit> {
        let mut state = self.lock();
        (state.in_flight < state.limit).then(|| {
            state.in_flight += 1;
            Permit { limit: Arc::clone(self), started: Instant::now(), in_flight: state.in_flight, epoch: state.epoch }
        })
    }

    /// Resolves once a write ends or the limit goes up (possibly spuriously): then there may be room.
    /// Create it before [`WriteLimit::try_start`] fails, so that no ending is missed in between.
    pub fn room(&self) -> tokio::sync::futures::Notified<'_> {
        self.room.notified()
    }

    fn took(&self, permit: &Permit, answer: Answer, now: Instant) {
        let mut state = self.lock();
        let before = state.limit;
        if state.epoch == permit.epoch && self.floor < self.ceiling {
            state.take(permit, answer, now, (self.floor, self.ceiling));
        }
        let limit = state.limit;
        drop(state);
        if limit == before {
            return;
        }
        if let Some((layer, gauge)) = &self.gauge {
            gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
            tracing::debug!(layer, limit, before, ?answer, "write limit");
        }
        if limit > before {
            self.room.notify_waiters();
        }
    }
}

impl State {
    /// Takes in one answered write, started under the current limit.
    fn take(&mut self, permit: &Permit, answer: Answer, now: Instant, (floor, ceiling): (usize, usize)) {
        if answer == Answer::Overloaded {
            self.set((self.limit / 2).max(floor));
            return;
        }
        if self.window.last.is_some_and(|last| now.duration_since(last) > STALE) {
            self.window = Window::default();
        }
        let window = &mut self.window;
        window.writes += 1;
        window.in_flight += permit.in_flight as f64;
        window.seconds += now.duration_since(permit.started).as_secs_f64();
        window.last = Some(now);
        let size = (2 * u32::try_from(self.limit).unwrap_or(u32::MAX)).max(MIN_WINDOW);
        if window.writes < size {
            return;
        }
        let window = std::mem::take(&mut self.window);
        let writes = f64::from(window.writes);
        if window.seconds / writes >= SLOW.as_secs_f64() {
            self.set((self.limit - self.limit / 4).max(floor));
        } else if self.hold > 0 {
            self.hold -= 1;
        } else if window.in_flight / writes >= FILLED * self.limit as f64 {
            self.to((self.limit + (self.limit / 2).max(1)).min(ceiling));
        }
    }

    /// Down to `limit`, held there for a while.
    fn set(&mut self, limit: usize) {
        self.to(limit);
        self.window = Window::default();
        self.hold = HOLD;
    }

    /// Writes start under `limit` from now on; the ones in flight are no longer measured.
    fn to(&mut self, limit: usize) {
        if limit != self.limit {
            self.limit = limit;
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs whole windows through `limit`, the limit filled and each write taking `latency(limit)`
    /// seconds; returns the limit each window ran at, and the one after the last.
    fn drive(limit: &Arc<WriteLimit>, windows: usize, latency: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut seen = vec![];
        let mut now = Instant::now();
        for _ in 0..windows {
            let n = limit.limit();
            seen.push(n);
            let took = Duration::from_secs_f64(latency(n));
            for _ in 0..(2 * n).max(MIN_WINDOW as usize) {
                let mut permit = limit.try_start().expect("room up to the limit");
                (permit.started, permit.in_flight) = (now, n);
                now += took / u32::try_from(n).unwrap();
                limit.took(&permit, Answer::Answered, permit.started + took);
            }
        }
        seen.push(limit.limit());
        seen
    }

    fn moves(path: &[usize]) -> Vec<usize> {
        let mut moves = path.to_vec();
        moves.dedup();
        moves
    }

    #[test]
    fn the_limit_goes_up_by_half_per_filled_window_to_its_ceiling_while_the_server_answers_in_time() {
        let limit = Arc::new(WriteLimit::new(8, 32));
        let path = drive(&limit, 10, |n| 0.01 * n as f64);
        assert_eq!(moves(&path), [8, 12, 18, 27, 32], "{path:?}");
        let fixed = Arc::new(WriteLimit::fixed(8));
        assert!(drive(&fixed, 20, |n| 0.5 * n as f64).iter().all(|n| *n == 8));
        fixed.try_start().expect("room").finish(Answer::Overloaded);
        assert_eq!(fixed.limit(), 8, "fixed means fixed, overloaded or not");
    }

    #[test]
    fn slow_answers_bring_the_limit_down_and_it_waits_before_it_goes_up_again() {
        // Beyond 16 in flight the API server queues: writes take over a second.
        let limit = Arc::new(WriteLimit::new(16, 64));
        let path = drive(&limit, 40, |n| if n > 16 { 1.5 } else { 0.1 });
        assert_eq!(&moves(&path)[..4], [16, 24, 18, 14], "{path:?}");
        let queued = path.iter().filter(|n| **n > 16).count();
        assert!(queued * 5 <= path.len(), "mostly where it does not queue: {path:?}");
    }

    #[test]
    fn an_overloaded_answer_halves_the_limit_once_for_the_writes_in_flight_together() {
        let limit = Arc::new(WriteLimit::new(16, 32));
        let permits: Vec<_> = (0..16).map(|_| limit.try_start().expect("room")).collect();
        let mut permits = permits.into_iter();
        permits.next().unwrap().finish(Answer::Overloaded);
        assert_eq!(limit.limit(), 8);
        for permit in permits {
            permit.finish(Answer::Overloaded);
        }
        assert_eq!(limit.limit(), 8, "the others were in flight with the first: the same news");
        let permit = limit.try_start().expect("room once they ended");
        permit.finish(Answer::Overloaded);
        assert_eq!(limit.limit(), 4, "a write started after the cut, overloaded too");
        for _ in 0..5 {
            limit.try_start().expect("room").finish(Answer::Overloaded);
        }
        assert_eq!(limit.limit(), 1, "never below 1");
        let path = drive(&limit, HOLD as usize + 1, |_| 0.01);
        assert_eq!(moves(&path), [1, 2], "held for {HOLD} windows, then up again: {path:?}");
    }

    #[test]
    fn an_abandoned_write_gives_its_place_back_and_a_window_that_did_not_fill_the_limit_leaves_it() {
        let limit = Arc::new(WriteLimit::new(4, 64));
        let permit = limit.try_start().expect("room");
        let _others: Vec<_> = (0..3).map(|_| limit.try_start().expect("room")).collect();
        assert!(limit.try_start().is_none());
        drop(permit);
        assert!(limit.try_start().is_some(), "the abandoned write's place is free again");
        // One write at a time, far under the limit: the limit stays.
        let idle = Arc::new(WriteLimit::new(8, 64));
        for _ in 0..100 {
            idle.try_start().expect("room").finish(Answer::Answered);
        }
        assert_eq!(idle.limit(), 8);
    }
}
